"""Drop-in replacements for torch.nn.RNN, torch.nn.GRU and torch.nn.LSTM.

Each module subclasses its torch.nn counterpart, so the constructor, defaults, validation,
parameter names, shapes, registration order, initialisation and ``state_dict`` keys are
torch.nn's own; only ``forward`` runs rnnext's fused kernels. A ``state_dict`` therefore
moves between torch.nn and rnnext in both directions and gives the same results.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .functional import recurrent_layer

Tensor = torch.Tensor


class _FusedRNNMixin:
    """forward() for torch.nn's RNN modules on rnnext's layer op."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_supported()

    def forward(self, input, hx=None):
        return self._fused_forward(input, hx)

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
        self.check_forward_args(input, tuple(states) if is_lstm and hx is not None else states[0], None)
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
            output, h_n, c_n = output.squeeze(batch_dim), h_n.squeeze(1), c_n.squeeze(1)
        return output, ((h_n, c_n) if is_lstm else h_n)


class RNN(_FusedRNNMixin, nn.RNN):
    r"""Elman RNN, ``h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``; torch.nn.RNN's API.

    Arguments as :class:`torch.nn.RNN`. Input ``[T, B, I]`` (``[B, T, I]`` with
    ``batch_first``) or unbatched ``[T, I]``; ``hx`` ``[1, B, H]`` (``[1, H]`` unbatched).
    Returns ``(output [T, B, H], h_n [1, B, H])``.
    """


class GRU(_FusedRNNMixin, nn.GRU):
    r"""GRU in torch.nn's formulation; torch.nn.GRU's API.

    Arguments as :class:`torch.nn.GRU`. Input ``[T, B, I]`` (``[B, T, I]`` with
    ``batch_first``) or unbatched ``[T, I]``; ``hx`` ``[1, B, H]`` (``[1, H]`` unbatched).
    Returns ``(output [T, B, H], h_n [1, B, H])``.
    """


class LSTM(_FusedRNNMixin, nn.LSTM):
    r"""LSTM in torch.nn's formulation; torch.nn.LSTM's API.

    Arguments as :class:`torch.nn.LSTM`. Input ``[T, B, I]`` (``[B, T, I]`` with
    ``batch_first``) or unbatched ``[T, I]``; ``hx`` a tuple ``(h_0, c_0)`` of ``[1, B, H]``
    (``[1, H]`` unbatched). Returns ``(output [T, B, H], (h_n [1, B, H], c_n [1, B, H]))``.
    """
