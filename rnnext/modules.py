"""Drop-in replacements for torch.nn.RNN, torch.nn.GRU and torch.nn.LSTM.

Each module is a torch.nn.RNNBase, built by torch.nn's own constructor: the arguments,
defaults, validation, parameter names, shapes, registration order, initialisation and
``state_dict`` keys are torch.nn's. Only ``forward`` differs: it runs rnnext's fused kernels.
A ``state_dict`` therefore moves between torch.nn and rnnext in both directions and gives the
same results. They derive from RNNBase rather than from torch.nn.RNN, GRU or LSTM because
torch.compile refuses to trace those three classes; rnnext's modules compile as one graph.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .functional import recurrent_layer

Tensor = torch.Tensor


class _FusedRNNBase(nn.RNNBase):
    """torch.nn's RNNBase with forward() on rnnext's layer op."""

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            mode,
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            proj_size=proj_size,
            device=device,
            dtype=dtype,
        )
        self._check_supported()

    def _check_supported(self) -> None:
        name = f"rnnext.{type(self).__name__}"
        unsupported = {
            "num_layers": (self.num_layers, 1),
            "bidirectional": (self.bidirectional, False),
            "proj_size": (getattr(self, "proj_size", 0), 0),
        }
        for arg, (value, supported) in unsupported.items():
            if value != supported:
                raise NotImplementedError(
                    f"{name}: {arg}={value!r} is not supported yet; this version runs "
                    f"{arg}={supported!r} only"
                )

    def _fused_forward(self, input: Tensor, hx):
        """torch.nn's argument handling and checks around rnnext's layer op."""
        name = f"rnnext.{type(self).__name__}"
        if isinstance(input, PackedSequence):
            raise NotImplementedError(
                f"{name}: PackedSequence input is not supported yet; pass a padded tensor"
            )
        if not isinstance(input, Tensor) or input.dim() not in (2, 3):
            got = f"{input.dim()}D input" if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {got} instead")
        is_lstm = self.mode == "LSTM"
        if is_lstm and hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError(f"{name}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
        states = list(hx) if is_lstm and hx is not None else [hx]
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        for state in states:
            if state is not None and state.dim() != input.dim():
                kind = "batched 3-D" if batched else "unbatched 2-D"
                raise RuntimeError(
                    f"{name}: For {kind} input, hx should also be {input.dim()}-D "
                    f"but got {state.dim()}-D tensor"
                )
        if not batched:
            input = input.unsqueeze(batch_dim)
            states = [s.unsqueeze(1) if s is not None else None for s in states]
        if hx is None:
            self.check_input(input, None)
        else:
            self.check_forward_args(input, tuple(states) if is_lstm else states[0], None)
        if self.batch_first:
            input = input.transpose(0, 1)
        h0, c0 = (states + [None])[:2]
        output, h_n, c_n = recurrent_layer(
            self.mode,
            input,
            self._flat_weights,
            h0,
            c0,
            has_biases=self.bias,
            bidirectional=self.bidirectional,
        )
        if self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            output, h_n = output.squeeze(batch_dim), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if is_lstm else c_n
        return output, ((h_n, c_n) if is_lstm else h_n)


class RNN(_FusedRNNBase):
    r"""Elman RNN, ``h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``; torch.nn.RNN's API.

    Arguments as :class:`torch.nn.RNN`. Input ``[T, B, I]`` (``[B, T, I]`` with
    ``batch_first``) or unbatched ``[T, I]``; ``hx`` ``[1, B, H]`` (``[1, H]`` unbatched).
    Returns ``(output [T, B, H], h_n [1, B, H])``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if nonlinearity not in modes:
            raise ValueError(
                f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        self.nonlinearity = nonlinearity
        super().__init__(
            modes[nonlinearity],
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            device=device,
            dtype=dtype,
        )

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._fused_forward(input, hx)


class GRU(_FusedRNNBase):
    r"""GRU in torch.nn's formulation; torch.nn.GRU's API.

    Arguments as :class:`torch.nn.GRU`. Input ``[T, B, I]`` (``[B, T, I]`` with
    ``batch_first``) or unbatched ``[T, I]``; ``hx`` ``[1, B, H]`` (``[1, H]`` unbatched).
    Returns ``(output [T, B, H], h_n [1, B, H])``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            "GRU",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            device=device,
            dtype=dtype,
        )

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._fused_forward(input, hx)


class LSTM(_FusedRNNBase):
    r"""LSTM in torch.nn's formulation; torch.nn.LSTM's API.

    Arguments as :class:`torch.nn.LSTM`. Input ``[T, B, I]`` (``[B, T, I]`` with
    ``batch_first``) or unbatched ``[T, I]``; ``hx`` a tuple ``(h_0, c_0)`` of ``[1, B, H]``
    (``[1, H]`` unbatched). Returns ``(output [T, B, H], (h_n [1, B, H], c_n [1, B, H]))``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            "LSTM",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            device=device,
            dtype=dtype,
        )

    # torch.nn.LSTM's own checks of the (h_0, c_0) pair, with its messages
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        return self._fused_forward(input, hx)
