"""The autograd Function that joins rnnext's forward and backward layer ops."""

from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (registers the ops and their fake kernels)

# Position of the first tensor argument of LayerFunction: mode, has_biases, bidirectional and
# lengths come first.
_FIRST_TENSOR = 4


class LayerFunction(torch.autograd.Function):
    """One recurrent layer.

    Inputs: (mode, has_biases, bidirectional, lengths, input, hx, cx, *weights); returns
    (output, h_n, c_n, workspace). The workspace holds what backward needs and is not
    differentiable. Backward computes only the gradient groups (input, states, weights) that
    some input asks for, and hands None output gradients to the op as zeros without making them.
    """

    @staticmethod
    def forward(mode, has_biases, bidirectional, lengths, input, hx, cx, *weights):
        return torch.ops.rnnext.layer_forward(
            mode, input, list(weights), hx, cx, has_biases, bidirectional, lengths, True
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        mode, has_biases, bidirectional, lengths, input, hx, cx, *weights = inputs
        out, _h_n, _c_n, workspace = output
        ctx.mode, ctx.has_biases, ctx.bidirectional = mode, has_biases, bidirectional
        ctx.save_for_backward(lengths, input, hx, cx, out, workspace, *weights)
        ctx.mark_non_differentiable(workspace)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_workspace):
        lengths, input, hx, cx, out, workspace, *weights = ctx.saved_tensors
        need_input, need_hx, need_cx, *need_weights = ctx.needs_input_grad[_FIRST_TENSOR:]
        grad_input, grad_hx, grad_cx, grad_weights = torch.ops.rnnext.layer_backward(
            ctx.mode,
            input,
            weights,
            hx,
            cx,
            out,
            workspace,
            grad_output,
            grad_h_n,
            grad_c_n if ctx.mode == "LSTM" else None,
            ctx.has_biases,
            ctx.bidirectional,
            lengths,
            [need_input, need_hx or need_cx, any(need_weights)],
        )
        if not grad_weights:
            grad_weights = [None] * len(weights)
        return (
            None,
            None,
            None,
            None,
            grad_input if need_input else None,
            grad_hx if need_hx else None,
            grad_cx if need_cx else None,
            *(g if need else None for g, need in zip(grad_weights, need_weights)),
        )
