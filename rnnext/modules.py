"""Drop-in replacements for torch.nn.RNN, torch.nn.GRU and torch.nn.LSTM.

Each module is a torch.nn.RNNBase, built by torch.nn's own constructor: the arguments,
defaults, validation, parameter names, shapes, registration order, initialisation and
``state_dict`` keys are torch.nn's. Only ``forward`` differs: it runs rnnext's fused kernels
(and, during an ONNX export, torch.nn's own forward, which the exporters translate).
A ``state_dict`` therefore moves between torch.nn and rnnext in both directions and gives the
same results. They derive from RNNBase rather than from torch.nn.RNN, GRU or LSTM because
torch.compile refuses to trace those three classes; rnnext's modules compile as one graph.
"""

from __future__ import annotations

import numbers
import warnings

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .functional import _any_autocast_enabled, check_lengths, recurrent_layer, select_batch

Tensor = torch.Tensor


class _FusedRNNBase(nn.RNNBase):
    """torch.nn's RNNBase with forward() on rnnext's layer op."""

    # the torch.nn module of the same kind (RNN, GRU or LSTM), set by each subclass
    _torch_class: type[nn.RNNBase]

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
        *,
        checkpoint_every: int | None = None,
        weight_dropout: float = 0.0,
        variational_dropout: bool = False,
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
        # rnnext's own options (not part of the state_dict): see rnnext.functional, and
        # _recurrent_weights below
        self.checkpoint_every = checkpoint_every
        self.weight_dropout = weight_dropout  # (checked by the properties below)
        self.variational_dropout = variational_dropout

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first; without it, scripting fails on forward's
        # signature with a message that says nothing of what to do
        raise RuntimeError(
            f"rnnext.{type(self).__name__}: torch.jit.script cannot compile rnnext's modules, "
            "whose forward runs a Python autograd function. Use torch.compile, torch.export, "
            "torch.onnx.export or, for inference, torch.jit.trace under torch.no_grad()"
        )

    def extra_repr(self) -> str:
        s = super().extra_repr()
        every = getattr(self, "checkpoint_every", None)
        s = s if every is None else f"{s}, checkpoint_every={every}"
        s = s if not self.weight_dropout else f"{s}, weight_dropout={self.weight_dropout}"
        return f"{s}, variational_dropout=True" if self.variational_dropout else s

    # rnnext's dropout options, checked whenever they are set; a module converted from
    # torch.nn, whose constructor did not run, reads the defaults
    @property
    def weight_dropout(self) -> float:
        """DropConnect probability on each direction's W_hh in training (0: none); see
        ``_recurrent_weights``."""
        return self.__dict__.get("_weight_dropout", 0.0)

    @weight_dropout.setter
    def weight_dropout(self, p: float) -> None:
        # torch.nn's own rule for its `dropout`: a number, not a bool, in [0, 1]
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p <= 1:
            raise ValueError(
                f"rnnext.{type(self).__name__}: weight_dropout must be a number in [0, 1], "
                f"got {p!r}"
            )
        self.__dict__["_weight_dropout"] = float(p)

    @property
    def variational_dropout(self) -> bool:
        """Whether ``dropout`` between layers draws one mask per sequence for all its steps."""
        return self.__dict__.get("_variational_dropout", False)

    @variational_dropout.setter
    def variational_dropout(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(
                f"rnnext.{type(self).__name__}: variational_dropout must be True or False, "
                f"got {value!r}"
            )
        self.__dict__["_variational_dropout"] = value

    def _refresh_flat_weights(self) -> None:
        """torch.nn's _update_flat_weights (which re-reads the weights where one was replaced,
        by torch.func.functional_call say), with the usual case, each weight still the
        Parameter registered under its name, told by a dict lookup per weight: torch.nn's
        check (hasattr and getattr through Module.__getattr__) took 5.7 us, a fifth of a
        one-step forward at H = 64."""
        parameters = self._parameters
        for name, weight in zip(self._flat_weights_names, self._flat_weights):
            if parameters.get(name) is not weight:
                self._update_flat_weights()
                return

    def _fused_forward(self, input, hx, lengths: Tensor | None):
        """torch.nn's argument handling and checks around rnnext's layer op. (The modules'
        forward takes ``lengths`` positionally too, since torch.onnx's TorchScript-based
        exporter passes every argument of forward by position, defaults included.)"""
        # (an ONNX export traces, or compiles; the export check itself costs a microsecond)
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if tracing and torch.onnx.is_in_onnx_export():
            return self._onnx_forward(input, hx, lengths)
        name = f"rnnext.{type(self).__name__}"
        self._refresh_flat_weights()
        is_lstm = self.mode == "LSTM"
        if is_lstm and hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError(f"{name}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
        states = list(hx) if is_lstm and hx is not None else [hx, None]

        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError(f"{name}: lengths must be None for a PackedSequence input")
            return self._packed_forward(input, states)
        if not isinstance(input, Tensor) or input.dim() not in (2, 3):
            got = f"{input.dim()}D input" if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {got} instead")
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
            lengths = torch.as_tensor(lengths).reshape(1) if lengths is not None else None
        self._check_input_and_states(input, states)
        if self.batch_first:
            input = input.transpose(0, 1)
        if lengths is not None:
            lengths = torch.as_tensor(lengths)
            check_lengths(lengths, input, *states)
        output, h_n, c_n = self._layers(input, states, lengths)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            output, h_n = output.squeeze(batch_dim), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if is_lstm else c_n
        return output, ((h_n, c_n) if is_lstm else h_n)

    def _onnx_forward(self, input, hx, lengths: Tensor | None):
        """torch.nn's own forward on the same parameters, for ONNX export: the exporters
        translate torch.nn's recurrent ops to ONNX's RNN, GRU and LSTM operators, which any
        ONNX runtime runs, where rnnext's op means nothing. ``lengths`` go through a
        PackedSequence, as torch.nn takes them, and come back padded with zeros."""
        torch_forward = self._torch_class.forward
        if lengths is None:
            return torch_forward(self, input, hx)
        name = f"rnnext.{type(self).__name__}"
        if not torch.jit.is_tracing():
            raise ValueError(
                f"{name}: ONNX export with lengths needs the TorchScript-based exporter, "
                "torch.onnx.export(..., dynamo=False); the dynamo-based one cannot convert "
                "torch.nn's packed sequences, which carry the lengths into ONNX"
            )
        if not isinstance(input, Tensor) or input.dim() != 3:
            got = f"{input.dim()}-D input" if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(
                f"{name}: ONNX export takes lengths with a batched 3-D input only, got {got}"
            )
        time_dim = 1 if self.batch_first else 0
        packed = pack_padded_sequence(
            input, torch.as_tensor(lengths).cpu(), self.batch_first, enforce_sorted=False
        )
        output, hidden = torch_forward(self, packed, hx)
        output, _ = pad_packed_sequence(
            output, self.batch_first, total_length=input.shape[time_dim]
        )
        return output, hidden

    def _check_input_and_states(self, input: Tensor, states: list, batch_sizes=None) -> None:
        """torch.nn's checks of the input and the initial states (RNNBase.check_forward_args,
        LSTM's), with its messages. Written here because torch.compile of torch 2.4 and 2.5
        (and torch.export of 2.5) cannot trace torch.nn's own. ``input`` is [T, B, I] (B
        first with batch_first), or a PackedSequence's data [N, I] with its ``batch_sizes``;
        ``states`` holds h_0 and c_0, each a tensor or None."""
        weight = self._flat_weights[0]
        if input.dtype != weight.dtype and not _any_autocast_enabled():
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
                f"Convert input: input.to({weight.dtype}), or convert model: "
                f"model.to({input.dtype})"
            )
        expected_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(
                "input.size(-1) must be equal to input_size. "
                f"Expected {self.input_size}, got {input.size(-1)}"
            )
        if batch_sizes is not None:
            batch = int(batch_sizes[0])
        else:
            batch = input.size(0) if self.batch_first else input.size(1)
        layers = self.num_layers * (2 if self.bidirectional else 1)
        is_lstm = self.mode == "LSTM"
        expected = [
            (
                (layers, batch, self.proj_size or self.hidden_size),
                "hidden[0]" if is_lstm else "hidden",
            ),
            ((layers, batch, self.hidden_size), "hidden[1]"),
        ]
        for state, (size, label) in zip(states, expected):
            if state is not None and state.size() != size:
                raise RuntimeError(f"Expected {label} size {size}, got {list(state.size())}")

    def _packed_forward(self, packed: PackedSequence, states: list):
        """A PackedSequence runs as its padded, sorted batch with lengths, in the same kernels."""
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        T, B = batch_sizes.numel(), int(batch_sizes[0])
        # packed rows are the active (t, b) pairs in step-major order
        active = torch.arange(B)[None, :] < batch_sizes[:, None]
        rows = active.flatten().nonzero().squeeze(1).to(data.device)
        padded = data.new_zeros(T * B, data.shape[1]).index_copy(0, rows, data)
        lengths = active.sum(0)
        self._check_input_and_states(data, states, batch_sizes)
        if sorted_indices is not None:
            states = select_batch(states, sorted_indices, unsorted_indices)
        output, h_n, c_n = self._layers(padded.view(T, B, -1), states, lengths)
        if unsorted_indices is not None:
            h_n, c_n = select_batch([h_n, c_n], unsorted_indices, sorted_indices)
        output = PackedSequence(
            output.view(T * B, -1).index_select(0, rows),
            batch_sizes,
            sorted_indices,
            unsorted_indices,
        )
        return output, ((h_n, c_n) if self.mode == "LSTM" else h_n)

    def _layers(self, input: Tensor, states: list, lengths: Tensor | None):
        """All layers on a time-major batch, with lengths in any order (or None).
        Returns the output, h_n and c_n (None but for an LSTM)."""
        D = 2 if self.bidirectional else 1
        layers = self.num_layers
        per_layer = len(self._flat_weights) // layers
        h0, c0 = states
        h_n, c_n = [], []
        for layer in range(layers):
            # (a single layer's states as they are: indexing a tensor costs a microsecond)
            directions = slice(layer * D, (layer + 1) * D)
            output, h, c = recurrent_layer(
                self.mode,
                input,
                self._recurrent_weights(
                    self._flat_weights[layer * per_layer : (layer + 1) * per_layer]
                ),
                h0[directions] if h0 is not None and layers > 1 else h0,
                c0[directions] if c0 is not None and layers > 1 else c0,
                has_biases=self.bias,
                bidirectional=self.bidirectional,
                lengths=lengths,
                # modules converted from torch.nn have no such attribute
                checkpoint_every=getattr(self, "checkpoint_every", None),
            )
            h_n.append(h)
            c_n.append(c)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                # torch.nn's place for dropout: between layers, in training only
                if self.variational_dropout:
                    # one mask per sequence [1, B, F], the same at every time step
                    keep = output.new_ones((1, *output.shape[1:]))
                    output = output * F.dropout(keep, self.dropout, training=True)
                else:
                    output = F.dropout(output, self.dropout, training=True)
            input = output
        return input, _join_layers(h_n), (_join_layers(c_n) if self.mode == "LSTM" else None)

    def _recurrent_weights(self, weights: list[Tensor]) -> list[Tensor]:
        """One layer's weights, with DropConnect on its hidden-to-hidden weights W_hh in
        training when ``weight_dropout`` > 0: each element of each direction's W_hh is zeroed
        with that probability and the rest scaled by 1 / (1 - p), one mask per forward call,
        shared by every time step and batch row (the weight-dropped LSTM of Merity et al.,
        "Regularizing and Optimizing LSTM Language Models", 2017)."""
        p = self.weight_dropout
        if not p or not self.training:
            return weights
        weights = list(weights)
        per_direction = len(weights) // (2 if self.bidirectional else 1)
        for w_hh in range(1, len(weights), per_direction):
            weights[w_hh] = drop_connect(weights[w_hh], p)
        return weights


def drop_connect(weight: Tensor, p: float) -> Tensor:
    """``weight`` with each element kept where a uniform draw in [0, 1) is at least ``p`` and
    scaled by 1 / (1 - p), zeroed elsewhere. (F.dropout does the same with Bernoulli draws,
    which on the CPU took 2.4 ms for a 768 x 256 weight against 0.7 ms this way.) The draws
    are float32 whatever the weight's dtype: bfloat16 draws take 256 values, which would skew
    the dropped fraction; the scale multiplies the product, not a rounded copy of itself."""
    keep = torch.rand(weight.shape, device=weight.device) >= p
    return weight.mul(keep).mul_(1.0 / (1.0 - p) if p < 1 else 0.0)


def _join_layers(states: list[Tensor]) -> Tensor:
    """The layers' final states [D, B, *] as one [L*D, B, *]: a single layer's as it is (a
    torch.cat of one tensor would copy it and add a backward node)."""
    return states[0] if len(states) == 1 else torch.cat(states)


class RNN(_FusedRNNBase):
    r"""Elman RNN, ``h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``; torch.nn.RNN's API.

    Arguments as :class:`torch.nn.RNN`. Input ``[T, B, I]`` (``[B, T, I]`` with
    ``batch_first``) or unbatched ``[T, I]``; ``hx`` ``[L*D, B, H]`` (``[L*D, H]`` unbatched)
    for L layers and D directions. Returns ``(output [T, B, D*H], h_n [L*D, B, H])``.

    Beyond torch.nn: ``forward(input, hx, lengths=...)`` for per-sequence lengths,
    ``checkpoint_every`` for bounded memory on long sequences (see
    :func:`rnnext.functional.recurrent_layer`), ``weight_dropout`` for DropConnect on the
    hidden-to-hidden weights in training, and ``variational_dropout=True`` for one
    ``dropout`` mask per sequence between layers, the same at every time step.
    """

    _torch_class = nn.RNN

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
        *,
        checkpoint_every: int | None = None,
        weight_dropout: float = 0.0,
        variational_dropout: bool = False,
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
            checkpoint_every=checkpoint_every,
            weight_dropout=weight_dropout,
            variational_dropout=variational_dropout,
        )

    def forward(
        self, input: Tensor, hx: Tensor | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self._fused_forward(input, hx, lengths)


class GRU(_FusedRNNBase):
    r"""GRU in torch.nn's formulation; torch.nn.GRU's API.

    Arguments as :class:`torch.nn.GRU`. Input ``[T, B, I]`` (``[B, T, I]`` with
    ``batch_first``) or unbatched ``[T, I]``; ``hx`` ``[L*D, B, H]`` (``[L*D, H]`` unbatched)
    for L layers and D directions. Returns ``(output [T, B, D*H], h_n [L*D, B, H])``.

    Beyond torch.nn: ``forward(input, hx, lengths=...)`` for per-sequence lengths,
    ``checkpoint_every`` for bounded memory on long sequences (see
    :func:`rnnext.functional.recurrent_layer`), ``weight_dropout`` for DropConnect on the
    hidden-to-hidden weights in training, and ``variational_dropout=True`` for one
    ``dropout`` mask per sequence between layers, the same at every time step.
    """

    _torch_class = nn.GRU

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
        *,
        checkpoint_every: int | None = None,
        weight_dropout: float = 0.0,
        variational_dropout: bool = False,
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
            checkpoint_every=checkpoint_every,
            weight_dropout=weight_dropout,
            variational_dropout=variational_dropout,
        )

    def forward(
        self, input: Tensor, hx: Tensor | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self._fused_forward(input, hx, lengths)


class LSTM(_FusedRNNBase):
    r"""LSTM in torch.nn's formulation; torch.nn.LSTM's API.

    Arguments as :class:`torch.nn.LSTM`. Input ``[T, B, I]`` (``[B, T, I]`` with
    ``batch_first``) or unbatched ``[T, I]``; ``hx`` a tuple ``(h_0 [L*D, B, P], c_0 [L*D, B,
    H])`` for L layers and D directions, P = ``proj_size`` or H (no batch dimension
    unbatched). Returns ``(output [T, B, D*P], (h_n [L*D, B, P], c_n [L*D, B, H]))``.

    Beyond torch.nn: ``forward(input, hx, lengths=...)`` for per-sequence lengths,
    ``checkpoint_every`` for bounded memory on long sequences (see
    :func:`rnnext.functional.recurrent_layer`), ``weight_dropout`` for DropConnect on the
    hidden-to-hidden weights in training, and ``variational_dropout=True`` for one
    ``dropout`` mask per sequence between layers, the same at every time step.
    """

    _torch_class = nn.LSTM

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
        *,
        checkpoint_every: int | None = None,
        weight_dropout: float = 0.0,
        variational_dropout: bool = False,
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
            checkpoint_every=checkpoint_every,
            weight_dropout=weight_dropout,
            variational_dropout=variational_dropout,
        )

    # torch.nn.LSTM's own methods for checking the (h_0, c_0) pair, which code written for
    # torch.nn may call (the forward checks in _check_input_and_states)
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def forward(
        self,
        input: Tensor,
        hx: tuple[Tensor, Tensor] | None = None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        return self._fused_forward(input, hx, lengths)


_TO_RNNEXT: dict[type, type] = {cls._torch_class: cls for cls in (RNN, GRU, LSTM)}
_TO_TORCH: dict[type, type] = {ours: theirs for theirs, ours in _TO_RNNEXT.items()}


def _swap_classes(model: nn.Module, mapping: dict[type, type]) -> nn.Module:
    # Changing the class of each module object keeps everything it holds: the very same
    # Parameter objects (so an optimiser built earlier keeps working), buffers, hooks, mode,
    # and every reference to the module elsewhere in the program.
    for module in model.modules():
        new_class = mapping.get(type(module))
        if new_class is not None:
            module.__class__ = new_class
    return model


def convert(model: nn.Module) -> nn.Module:
    """Makes every torch.nn.RNN, GRU and LSTM inside ``model`` (``model`` included) run on rnnext.

    In place: each such module becomes the rnnext module of the same kind, with the same
    Parameter objects, state, hooks and training mode, so an optimiser built before the call
    keeps working. Only modules whose type is exactly torch.nn.RNN, GRU or LSTM change; a
    subclass of them may override ``forward`` and is left alone. Returns ``model``.
    """
    return _swap_classes(model, _TO_RNNEXT)


def revert(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: rnnext.RNN, GRU and LSTM become torch.nn's again.

    torch.nn has no ``weight_dropout``, ``variational_dropout`` or ``checkpoint_every``: a
    module that uses one of them warns that torch.nn's forward will not (the values stay on the
    module, so a later :func:`convert` uses them again)."""
    for name, module in model.named_modules():
        if isinstance(module, _FusedRNNBase):
            options = {
                "weight_dropout": module.weight_dropout,
                "variational_dropout": module.variational_dropout,
                "checkpoint_every": getattr(module, "checkpoint_every", None),
            }
            used = [f"{k}={v}" for k, v in options.items() if v not in (0.0, False, None)]
            if used:
                warnings.warn(
                    f"rnnext.revert: torch.nn has no {', '.join(used)}; "
                    f"torch.nn's forward of {name or 'the model'} will not use them",
                    stacklevel=2,
                )
    return _swap_classes(model, _TO_TORCH)
