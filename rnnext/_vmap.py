"""torch.func.vmap for rnnext's layers: rules for both autograd Functions and both ops.

A vmapped call maps a layer over n samples. Where the samples share the weights and the
lengths, they run as one call over all their rows: the batch axis of every per-row tensor
grows from B to B*n, row b*n + k being sample k's row b (lengths sorted longest first stay
sorted when each is repeated n times, so the op copies nothing to sort them; other lengths
the op sorts stably, which keeps the n copies of a row together and each sample's rows in the
order of a single sample's call, as a per-sample backward's workspace needs). Autograd then
records one call, whose backward sums the weight gradients over the samples, which is what a
loss over the vmapped results asks for. Where each sample has weights or lengths of its own
(a vmapped ensemble, say), or where vmap asks for each sample's own weight gradients (the
backward op under vmap, as in vmap(grad(loss)): per-sample gradients), the samples run one
call each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import _ops  # noqa: F401  (registers the ops)

# Batch axes of layer_forward's outputs (and of LayerFunction's): output [T, B, *], h_n and
# c_n [D, B, *], workspace [D, T, B, W]
FORWARD_OUT_AXES = (1, 1, 1, 2)


def _batched(dim) -> bool:
    return any(d is not None for d in dim) if isinstance(dim, list) else dim is not None


def _sample(arg, dim, k: int):
    """Sample k of a vmapped argument (a tensor, a list of tensors, or anything else)."""
    if isinstance(dim, list):
        return [a if d is None else a.select(d, k) for a, d in zip(arg, dim)]
    return arg if dim is None else arg.select(dim, k)


def _fold(t, dim, n: int, axis: int):
    """The n samples of a tensor as one, their rows side by side on the batch axis (``axis``
    of the per-sample shape). A tensor not vmapped (``dim`` None) is every sample's."""
    if t is None:
        return None
    if dim is None:
        t = t.unsqueeze(axis + 1).expand(*t.shape[: axis + 1], n, *t.shape[axis + 1 :])
    else:
        t = t.movedim(dim, axis + 1)
    return t.reshape(*t.shape[:axis], -1, *t.shape[axis + 2 :])


def _unfold(t, n: int, axis):
    """The inverse of _fold: (the tensor with its samples on their own dimension, that
    dimension). An empty 1-D tensor (a mode's missing c_n or workspace, an unwanted gradient)
    and an empty list (unwanted weight gradients) are no sample's: (t, None) and (t, [])."""
    if isinstance(t, list):
        assert not t, "a folded call computes no per-sample weight gradients"
        return t, []
    if t.dim() == 1 and t.numel() == 0:
        return t, None
    return t.unflatten(axis, (t.shape[axis] // n, n)), axis + 1


def _stack(results: Sequence):
    """The results of one call per sample, stacked: (outputs, their vmapped dimensions)."""
    outputs, dims = [], []
    for values in zip(*results):
        if isinstance(values[0], list):  # the weight gradients
            outputs.append([torch.stack(v) for v in zip(*values)])
            dims.append([0] * len(values[0]))
        else:
            outputs.append(torch.stack(values))
            dims.append(0)
    return tuple(outputs), tuple(dims)


def layer_vmap_rule(
    call: Callable,
    *,
    lengths_at: int,
    row_axes: dict[int, int],
    out_axes: Sequence[int],
    per_sample: Callable[[tuple], bool] = lambda args: False,
):
    """A vmap rule ``(info, in_dims, *args) -> (outputs, out_dims)`` for ``call(*args)``, a
    layer op or Function.apply. ``row_axes`` maps the positions of the per-row tensor
    arguments to their batch axes; ``out_axes`` gives the outputs' batch axes (the last one
    repeating); ``per_sample(args)`` says whether the call must run sample by sample even
    with shared weights and lengths."""

    def rule(info, in_dims, *args):
        n = info.batch_size
        shared = not any(
            _batched(d) for i, d in enumerate(in_dims) if i not in row_axes and i != lengths_at
        )
        if not shared or in_dims[lengths_at] is not None or per_sample(args):
            return _stack(
                [call(*(_sample(a, d, k) for a, d in zip(args, in_dims))) for k in range(n)]
            )
        args = list(args)
        for i, axis in row_axes.items():
            args[i] = _fold(args[i], in_dims[i], n, axis)
        if args[lengths_at] is not None:
            args[lengths_at] = args[lengths_at].repeat_interleave(n)
        results = call(*args)
        axes = [*out_axes, *[out_axes[-1]] * (len(results) - len(out_axes))]
        outputs, dims = zip(*(_unfold(t, n, axis) for t, axis in zip(results, axes)))
        return tuple(outputs), tuple(dims)

    return staticmethod(rule)


# torch.library.register_vmap (torch >= 2.5) gives the ops the rules below; without it, layers
# under torch.func transforms run as rnnext.reference (functional._transforms_without_op_rules)
OPS_HAVE_VMAP_RULES = hasattr(torch.library, "register_vmap")

if OPS_HAVE_VMAP_RULES:
    # layer_forward(mode, input, weights, hx, cx, has_biases, bidirectional, lengths,
    # need_workspace, bf16_products), which inference calls directly
    torch.library.register_vmap(
        "rnnext::layer_forward",
        layer_vmap_rule(
            torch.ops.rnnext.layer_forward,
            lengths_at=7,
            row_axes={1: 1, 3: 1, 4: 1},
            out_axes=FORWARD_OUT_AXES,
        ).__func__,
    )
    # layer_backward(mode, input, weights, hx, cx, output, workspace, grad_output, grad_h_n,
    # grad_c_n, has_biases, bidirectional, lengths, output_mask, bf16_products) under vmap
    # owes each sample its own weight gradients: one call per sample where they are wanted
    torch.library.register_vmap(
        "rnnext::layer_backward",
        layer_vmap_rule(
            torch.ops.rnnext.layer_backward,
            lengths_at=12,
            row_axes={1: 1, 3: 1, 4: 1, 5: 1, 6: 2, 7: 1, 8: 1, 9: 1},
            out_axes=(1, 1, 1, 0),
            per_sample=lambda args: bool(args[13][2]),
        ).__func__,
    )
