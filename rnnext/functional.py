"""Functional form of rnnext's recurrent layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._autograd import LayerFunction

Tensor = torch.Tensor


def recurrent_layer(
    mode: str,
    input: Tensor,
    weights: Sequence[Tensor],
    hx: Tensor | None = None,
    cx: Tensor | None = None,
    *,
    has_biases: bool = True,
    bidirectional: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Runs one recurrent layer over a whole sequence with rnnext's fused kernels.

    Args:
        mode: ``"RNN_TANH"``, ``"RNN_RELU"``, ``"GRU"`` or ``"LSTM"``.
        input: ``[T, B, I]``, time-major.
        weights: per direction ``w_ih [G*H, I]``, ``w_hh [G*H, H]`` and, when ``has_biases``,
            ``b_ih [G*H]``, ``b_hh [G*H]``, in torch.nn's order (a one-layer module's
            ``_flat_weights``); G is 1, 3, 4 for RNN, GRU, LSTM.
        hx: ``[D, B, H]`` initial hidden state, zeros when None (D = 2 if bidirectional).
        cx: ``[D, B, H]`` initial cell state (LSTM only), zeros when None.

    Returns:
        ``output [T, B, D*H]``, ``h_n [D, B, H]`` and ``c_n [D, B, H]`` (LSTM; an empty tensor
        for the other modes). Differentiable with respect to every tensor argument.
    """
    tensors = (input, hx, cx, *weights)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        output, h_n, c_n, _ = LayerFunction.apply(
            mode, has_biases, bidirectional, input, hx, cx, *weights
        )
    else:
        output, h_n, c_n, _ = torch.ops.rnnext.layer_forward(
            mode, input, list(weights), hx, cx, has_biases, bidirectional, None, False
        )
    return output, h_n, c_n
