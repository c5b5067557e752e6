"""Pooling over the hidden states of a recurrent layer, and a sequence classifier head.

Every function takes the layer's padded ``output`` (``[T, B, F]``, or ``[B, T, F]`` with
``batch_first=True``; F = D*P features) and optional per-sequence ``lengths`` (``[B]``
integers, on any device; None means every sequence has all T steps). Steps at or past a
sequence's length never reach the result, whatever the padding holds, and get no gradient.
All are plain tensor code: differentiable, on any device, and traced by
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import modules

Tensor = torch.Tensor


def _time_major(output: Tensor, batch_first: bool) -> Tensor:
    if output.dim() != 3:
        raise ValueError(f"rnnext.pooling: output must be 3-D, got shape {list(output.shape)}")
    return output.transpose(0, 1) if batch_first else output


def _lengths(lengths: Tensor | None, output: Tensor) -> Tensor:
    """[B] int64 lengths on output's device (T for every row when None), checked."""
    T, B = output.shape[0], output.shape[1]
    if lengths is None:
        return torch.full((B,), T, dtype=torch.int64, device=output.device)
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(
            f"rnnext.pooling: lengths must be 1-D of size B = {B}, got {list(lengths.shape)}"
        )
    if lengths.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"rnnext.pooling: lengths must be int64 or int32, got {lengths.dtype}")
    return lengths.to(device=output.device, dtype=torch.int64)


def valid_mask(output: Tensor, lengths: Tensor | None = None, batch_first: bool = False) -> Tensor:
    """Boolean ``[T, B]`` (``[B, T]`` with batch_first) mask of the steps within each length."""
    out = _time_major(output, batch_first)
    steps = torch.arange(out.shape[0], device=out.device)
    mask = steps[:, None] < _lengths(lengths, out)[None, :]
    return mask.t() if batch_first else mask


def last_state(
    output: Tensor,
    lengths: Tensor | None = None,
    *,
    batch_first: bool = False,
    bidirectional: bool = False,
) -> Tensor:
    """Each sequence's final hidden state, ``[B, F]``: the output at its own last step; for a
    bidirectional layer the forward half there and the backward half at step 0 (where the
    reverse direction ends). Zeros for a sequence of length 0."""
    out = _time_major(output, batch_first)
    T, B, F = out.shape
    lengths = _lengths(lengths, out)
    last = (lengths - 1).clamp(min=0)
    final = out.gather(0, last.view(1, B, 1).expand(1, B, F)).squeeze(0)
    if bidirectional:
        if F % 2:
            raise ValueError(f"rnnext.pooling: a bidirectional output has even F, got {F}")
        final = torch.cat([final[:, : F // 2], out[0, :, F // 2 :]], dim=1)
    return final * (lengths > 0).to(out.dtype)[:, None]


def mean_pool(
    output: Tensor, lengths: Tensor | None = None, *, batch_first: bool = False
) -> Tensor:
    """The mean of each sequence's hidden states over its valid steps, ``[B, F]`` (zeros for a
    sequence of length 0)."""
    out = _time_major(output, batch_first)
    lengths = _lengths(lengths, out)
    mask = valid_mask(out, lengths).to(out.dtype)
    total = (out * mask[:, :, None]).sum(0)
    return total / lengths.clamp(min=1).to(out.dtype)[:, None]


def attention_pool(
    output: Tensor,
    weight: Tensor,
    vector: Tensor,
    lengths: Tensor | None = None,
    *,
    batch_first: bool = False,
    bias: Tensor | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Additive attention over the steps: ``alpha_t = softmax_t(v . tanh(W h_t + b))`` over each
    sequence's valid steps, result ``sum_t alpha_t h_t``, ``[B, F]``.

    Args:
        weight: ``W [A, F]``; vector: ``v [A]``; bias: ``b [A]`` or None.
        return_weights: also return ``alpha`` (``[T, B]``, or ``[B, T]`` with batch_first;
            zero past each length, and everywhere for a sequence of length 0).
    """
    out = _time_major(output, batch_first)
    lengths = _lengths(lengths, out)
    scores = torch.tanh(nn.functional.linear(out, weight, bias)) @ vector  # [T, B]
    mask = valid_mask(out, lengths)
    scores = scores.masked_fill(~mask, float("-inf"))
    # a sequence of length 0 has no valid step: its weights are set to zero, not NaN
    alpha = torch.softmax(scores, dim=0).masked_fill(~mask, 0.0)
    pooled = (alpha[:, :, None] * out).sum(0)
    if return_weights:
        return pooled, alpha.t() if batch_first else alpha
    return pooled


class AttentionPooling(nn.Module):
    """:func:`attention_pool` with learned ``W [attention_size, features]``, ``b`` and ``v``."""

    def __init__(self, features: int, attention_size: int | None = None):
        super().__init__()
        attention_size = attention_size or features
        self.project = nn.Linear(features, attention_size)
        self.vector = nn.Parameter(torch.randn(attention_size) / attention_size**0.5)

    def forward(
        self, output: Tensor, lengths: Tensor | None = None, batch_first: bool = False
    ) -> Tensor:
        return attention_pool(
            output,
            self.project.weight,
            self.vector,
            lengths,
            batch_first=batch_first,
            bias=self.project.bias,
        )


POOLINGS = ("last", "mean", "attention")
CELLS = {"rnn": modules.RNN, "gru": modules.GRU, "lstm": modules.LSTM}


class SequenceClassifier(nn.Module):
    """Recurrent layer, pooling over its hidden states, linear layer: ``[B, C]`` logits.

    Args:
        cell: ``"rnn"``, ``"gru"`` or ``"lstm"`` (rnnext's modules).
        input_size: features per step; or, with ``vocab_size``, the embedding size.
        hidden_size, num_classes: as named.
        pooling: ``"last"`` (:func:`last_state`), ``"mean"`` (:func:`mean_pool`) or
            ``"attention"`` (:class:`AttentionPooling`).
        vocab_size: if given, inputs are token ids ``[B, T]`` (batch_first) embedded first.
        batch_first: input ``[B, T, ...]`` (default) or ``[T, B, ...]``.
        **rnn_kwargs: for the recurrent module (num_layers, bidirectional, dropout, ...).

    ``forward(input, lengths=None)``: lengths ``[B]`` per-sequence lengths (padding is never
    read).
    """

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        num_classes: int,
        *,
        pooling: str = "last",
        vocab_size: int | None = None,
        batch_first: bool = True,
        **rnn_kwargs,
    ):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"SequenceClassifier: cell must be one of {list(CELLS)}, got {cell!r}")
        if pooling not in POOLINGS:
            raise ValueError(
                f"SequenceClassifier: pooling must be one of {POOLINGS}, got {pooling!r}"
            )
        self.pooling, self.batch_first = pooling, batch_first
        self.embedding = nn.Embedding(vocab_size, input_size) if vocab_size else None
        self.rnn = CELLS[cell](input_size, hidden_size, batch_first=batch_first, **rnn_kwargs)
        features = hidden_size * (2 if self.rnn.bidirectional else 1)
        self.attention = AttentionPooling(features) if pooling == "attention" else None
        self.head = nn.Linear(features, num_classes)

    def forward(self, input: Tensor, lengths: Tensor | None = None) -> Tensor:
        x = self.embedding(input) if self.embedding is not None else input
        output = self.rnn(x, lengths=lengths)[0]
        if self.pooling == "last":
            pooled = last_state(
                output, lengths, batch_first=self.batch_first, bidirectional=self.rnn.bidirectional
            )
        elif self.pooling == "mean":
            pooled = mean_pool(output, lengths, batch_first=self.batch_first)
        else:
            pooled = self.attention(output, lengths, self.batch_first)
        return self.head(pooled)
