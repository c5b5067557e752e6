"""The autograd Function that joins rnnext's forward and backward layer ops."""

from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (registers the ops and their fake kernels)
from ._vmap import FORWARD_OUT_AXES, layer_vmap_rule

# Both Functions take five non-tensor arguments first, then input, hx, cx and the weights.
_FIRST_TENSOR = 5


def _input_gradients(ctx, grad_input, grad_hx, grad_cx, grad_weights):
    """What backward returns: None for the leading non-tensor arguments and for every input
    that needs no gradient."""
    need_input, need_hx, need_cx, *need_weights = ctx.needs_input_grad[_FIRST_TENSOR:]
    grad_weights = list(grad_weights) or [None] * len(need_weights)
    return (
        *([None] * _FIRST_TENSOR),
        grad_input if need_input else None,
        grad_hx if need_hx else None,
        grad_cx if need_cx else None,
        *(g if need else None for g, need in zip(grad_weights, need_weights)),
    )


def reference_layer(
    mode, has_biases, bidirectional, bf16_products, lengths, input, hx, cx, *weights
):
    """rnnext.reference's layer, in plain PyTorch ops that autograd and forward-mode AD
    differentiate. (bfloat16 weights beside float32 input, as a bfloat16 module hands them to
    the CPU op: the reference multiplies in the input's dtype; the cast is differentiable.)"""
    from . import reference

    return reference.recurrent_layer(
        mode,
        input,
        [w.to(input.dtype) for w in weights],
        hx,
        cx,
        has_biases=has_biases,
        bidirectional=bidirectional,
        lengths=lengths,
        bf16_products=bf16_products,
    )


def _reference_backward(ctx, lengths, tensors, grads):
    """Backward with create_graph=True: the gradients of rnnext.reference's recomputation of
    the layer (plain PyTorch ops, step by step), which autograd can differentiate again. The
    fused backward op has no derivative of its own; this path is slower but twice
    differentiable, and equal to the fused gradients up to rounding.

    tensors: (input, hx, cx, *weights) as the Function received them; grads: the output
    gradients (output, h_n, c_n), None where there is none. Returns what backward returns.
    """
    outputs = reference_layer(
        ctx.mode, ctx.has_biases, ctx.bidirectional, ctx.bf16_products, lengths, *tensors
    )
    pairs = [(t, g) for t, g in zip(outputs, grads) if g is not None and t.numel()]
    needs = ctx.needs_input_grad[_FIRST_TENSOR:]
    wanted = [t for t, need in zip(tensors, needs) if need]
    found = iter(
        torch.autograd.grad(
            [t for t, _ in pairs],
            wanted,
            [g for _, g in pairs],
            create_graph=True,
            allow_unused=True,
        )
        if pairs and wanted
        else [None] * len(wanted)
    )
    result = [next(found) if need else None for need in needs]
    return _input_gradients(ctx, result[0], result[1], result[2], result[3:])


try:  # torch.func's transform stack (torch >= 2.1)
    from torch._C._functorch import (
        TransformType,
        get_unwrapped,
        is_functorch_wrapped_tensor,
        maybe_get_level,
    )
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
except ImportError:  # then every backward with grad mode on takes the differentiable path
    retrieve_all_functorch_interpreters = None


def functorch_transforms() -> dict:
    """The torch.func transforms active here, {level: TransformType}; empty outside them or
    where this torch cannot tell."""
    if retrieve_all_functorch_interpreters is None or not (
        torch._C._are_functorch_transforms_active()
    ):
        return {}
    return {i.level(): i.key() for i in retrieve_all_functorch_interpreters()}


def _outermost(t):
    """The tensor below every torch.func wrapper of t."""
    while is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
    return t


def _differentiable_backward(saved) -> bool:
    """Whether backward must give results that can be differentiated again (rnnext.reference's
    recomputation) rather than run the fused op. Grad mode on in backward means
    create_graph=True, which torch.func.grad and vjp always ask for. Under torch.func the
    results are differentiated again only by a grad or jvp transform outside the one this
    backward serves (the level of the saved tensors' wrappers), or by autograd outside every
    transform where a saved tensor requires grad there. So a plain torch.func.grad, or
    vmap(grad) (per-sample gradients), of tensors that need no gradient outside it runs the
    fused backward: for an LSTM (100, 8, 64) torch.func.grad took 3.0-3.3 ms against 52-53 ms
    (best of 7). A vjp function called under vmap (torch.func.jacrev) finds the saved
    tensors' level ended: the recomputation gives wrong values there, the fused op right
    ones, but nothing can differentiate them again (jacrev of jacrev)."""
    if not torch.is_grad_enabled():
        return False
    transforms = functorch_transforms()
    if not transforms:
        return True
    differentiating = [
        level for level, key in transforms.items() if key in (TransformType.Grad, TransformType.Jvp)
    ]
    level = max((maybe_get_level(t) for t in saved if t is not None), default=-1)
    if level == -1:  # no torch.func wrappers: plain create_graph=True
        return True
    if level not in transforms:
        if differentiating:
            raise NotImplementedError(
                "rnnext: a layer's backward inside a torch.func.vjp function called under "
                "vmap (as in torch.func.jacrev) cannot be differentiated again "
                "(jacrev of jacrev); for a Hessian use torch.func.hessian, "
                "torch.func.jacrev(torch.func.grad(f)) or torch.autograd.functional.hessian"
            )
        return False
    return any(d < level for d in differentiating) or any(
        t is not None and _outermost(t).requires_grad for t in saved
    )


try:  # what Function.apply calls outside functorch transforms (torch >= 2.1)
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
except ImportError:  # then _PositionalFunction keeps torch's own apply
    _unwrap_dead_wrappers = None


class _PositionalFunction(torch.autograd.Function):
    """An autograd.Function called with positional arguments only, whose forward has no
    defaults. torch's Function.apply binds the arguments to forward's signature through
    `inspect` on every call (about 50 microseconds, most of a small layer's Python overhead);
    for such a call that binding changes nothing, so apply skips it outside functorch
    transforms."""

    @classmethod
    def apply(cls, *args):
        if _unwrap_dead_wrappers is None or torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        # what Function.apply does next, minus the binding
        return super(torch.autograd.Function, cls).apply(*_unwrap_dead_wrappers(args))


class LayerFunction(_PositionalFunction):
    """One recurrent layer.

    Inputs: (mode, has_biases, bidirectional, bf16_products, lengths, input, hx, cx, *weights);
    returns (output, h_n, c_n, workspace) (bf16_products: see the op schemas in
    csrc/rnnext.cpp). The workspace holds what backward needs and is not
    differentiable. Backward computes only the gradient groups (input, states, weights) that
    some input asks for, and hands None output gradients to the op as zeros without making them.
    """

    @staticmethod
    def forward(mode, has_biases, bidirectional, bf16_products, lengths, input, hx, cx, *weights):
        return torch.ops.rnnext.layer_forward(
            mode,
            input,
            list(weights),
            hx,
            cx,
            has_biases,
            bidirectional,
            lengths,
            True,
            bf16_products,
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        mode, has_biases, bidirectional, bf16_products, lengths, input, hx, cx, *weights = inputs
        out, _h_n, _c_n, workspace = output
        ctx.mode, ctx.has_biases, ctx.bidirectional = mode, has_biases, bidirectional
        ctx.bf16_products = bf16_products
        ctx.save_for_backward(lengths, input, hx, cx, out, workspace, *weights)
        ctx.mark_non_differentiable(workspace)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_workspace):
        saved = ctx.saved_tensors  # once: torch.utils.checkpoint lets each unpack only once
        lengths, input, hx, cx, out, workspace, *weights = saved
        if _differentiable_backward(saved):
            grads = (grad_output, grad_h_n, grad_c_n)
            return _reference_backward(ctx, lengths, (input, hx, cx, *weights), grads)
        need_input, need_hx, need_cx, *need_weights = ctx.needs_input_grad[_FIRST_TENSOR:]
        with torch.no_grad():  # (grad mode is on in a torch.func.grad's backward)
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
                ctx.bf16_products,
            )
        return _input_gradients(ctx, grad_input, grad_hx, grad_cx, grad_weights)


# Under torch.func.vmap (the arguments: five non-tensor ones, then input, hx, cx, weights)
LayerFunction.vmap = layer_vmap_rule(
    LayerFunction.apply, lengths_at=4, row_axes={5: 1, 6: 1, 7: 1}, out_axes=FORWARD_OUT_AXES
)


def _segments(steps: int, every: int, lengths):
    """(start, stop, lengths within the segment) for consecutive segments of `every` steps."""
    for start in range(0, steps, every):
        stop = min(start + every, steps)
        seg_lengths = None if lengths is None else (lengths - start).clamp(0, stop - start)
        yield start, stop, seg_lengths


@torch.no_grad()  # (grad mode is on in a torch.func.grad's backward)
def _recompute_backward(
    ctx, lengths, input, hx, cx, weights, states, grad_output, grad_h_n, grad_c_n
):
    """CheckpointedLayerFunction's fused backward: segment by segment in reverse, the
    segment's forward recomputed from its saved initial state, then its backward."""
    is_lstm = ctx.mode == "LSTM"
    segments = list(_segments(input.shape[0], ctx.every, lengths))
    n = len(segments) - 1
    starts_h = [hx, *states[:n]]
    starts_c = [cx, *states[n:]] if is_lstm else [None] * len(segments)
    need_input, _, _, *need_weights = ctx.needs_input_grad[_FIRST_TENSOR:]
    grad_input = torch.empty_like(input) if need_input else None
    grad_weights = [None] * len(weights)
    dh, dc = grad_h_n, grad_c_n if is_lstm else None
    for k in range(len(segments) - 1, -1, -1):
        start, stop, seg_lengths = segments[k]
        x = input[start:stop]
        h0, c0 = starts_h[k], starts_c[k]
        out, _, _, workspace = torch.ops.rnnext.layer_forward(
            ctx.mode,
            x,
            list(weights),
            h0,
            c0,
            ctx.has_biases,
            False,
            seg_lengths,
            True,
            ctx.bf16_products,
        )
        go = grad_output[start:stop] if grad_output is not None else None
        gi, dh, dc, gw = torch.ops.rnnext.layer_backward(
            ctx.mode,
            x,
            list(weights),
            h0,
            c0,
            out,
            workspace,
            go,
            dh,
            dc,
            ctx.has_biases,
            False,
            seg_lengths,
            [need_input, True, any(need_weights)],
            ctx.bf16_products,
        )
        dc = dc if is_lstm else None
        if need_input:
            grad_input[start:stop] = gi
        for i, g in enumerate(gw):  # (summed in float32: bfloat16 weights get bfloat16 g)
            g = g.float() if g.dtype == torch.bfloat16 else g
            grad_weights[i] = g if grad_weights[i] is None else grad_weights[i].add_(g)
    grad_weights = [g.to(w.dtype) if g is not None else None for g, w in zip(grad_weights, weights)]
    return _input_gradients(ctx, grad_input, dh, dc, grad_weights)


class CheckpointedLayerFunction(_PositionalFunction):
    """One unidirectional layer that keeps only the state every ``every`` steps.

    Inputs: (mode, has_biases, bf16_products, lengths, every, input, hx, cx, *weights); returns
    (output, h_n, c_n). Forward runs the layer segment by segment without saving what backward
    needs, and keeps each segment's initial state. Backward runs the segments in reverse
    order: for each, it recomputes the segment's forward (now saving) and runs its backward,
    carrying the state gradients to the segment before. Memory for backward is then that of
    one segment, at the price of a second forward pass.
    """

    @staticmethod
    def forward(mode, has_biases, bf16_products, lengths, every, input, hx, cx, *weights):
        output, starts_h, starts_c = None, [], []
        h, c = hx, cx
        for start, stop, seg_lengths in _segments(input.shape[0], every, lengths):
            starts_h.append(h)
            starts_c.append(c)
            out, h, c, _ = torch.ops.rnnext.layer_forward(
                mode,
                input[start:stop],
                list(weights),
                h,
                c,
                has_biases,
                False,
                seg_lengths,
                False,
                bf16_products,
            )
            if output is None:  # filled segment by segment: no second copy at the end
                output = out.new_empty((input.shape[0], *out.shape[1:]))
            output[start:stop] = out
            c = c if mode == "LSTM" else None
        # segment 0 starts from hx / cx as given (possibly None); the others from real states
        ctx_states = starts_h[1:] + starts_c[1:] if mode == "LSTM" else starts_h[1:]
        c_n = c if mode == "LSTM" else input.new_empty(0)
        return (output, h, c_n, *ctx_states)

    @staticmethod
    def setup_context(ctx, inputs, output):
        mode, has_biases, bf16_products, lengths, every, input, hx, cx, *weights = inputs
        ctx.mode, ctx.has_biases, ctx.every, ctx.n_weights = mode, has_biases, every, len(weights)
        ctx.bidirectional, ctx.bf16_products = False, bf16_products
        ctx.save_for_backward(lengths, input, hx, cx, *weights, *output[3:])
        ctx.mark_non_differentiable(*output[3:])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, *_):
        saved = ctx.saved_tensors
        lengths, input, hx, cx, *rest = saved
        weights, states = rest[: ctx.n_weights], rest[ctx.n_weights :]
        if _differentiable_backward(saved):  # no checkpointing on this path
            grads = (grad_output, grad_h_n, grad_c_n)
            return _reference_backward(ctx, lengths, (input, hx, cx, *weights), grads)
        return _recompute_backward(
            ctx, lengths, input, hx, cx, weights, states, grad_output, grad_h_n, grad_c_n
        )


# (output [T, B, *], then h_n, c_n and the segments' initial states, all [1, B, *])
CheckpointedLayerFunction.vmap = layer_vmap_rule(
    CheckpointedLayerFunction.apply, lengths_at=3, row_axes={5: 1, 6: 1, 7: 1}, out_axes=(1,)
)
