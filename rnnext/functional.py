"""Functional form of rnnext's recurrent layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd import forward_ad as _forward_ad

from . import _C
from ._autograd import (
    CheckpointedLayerFunction,
    LayerFunction,
    functorch_transforms,
    reference_layer,
)
from ._vmap import OPS_HAVE_VMAP_RULES

Tensor = torch.Tensor

# Device types with registered kernels (meta: shapes only), fixed when the library loads.
DEVICES_WITH_KERNELS = frozenset(
    ["meta"]
    + [
        device
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key("rnnext::layer_forward", key)
    ]
)


def recurrent_layer(
    mode: str,
    input: Tensor,
    weights: Sequence[Tensor],
    hx: Tensor | None = None,
    cx: Tensor | None = None,
    *,
    has_biases: bool = True,
    bidirectional: bool = False,
    lengths: Tensor | None = None,
    lengths_sorted: bool = False,
    checkpoint_every: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Runs one recurrent layer over a whole sequence with rnnext's fused kernels.

    Args:
        mode: ``"RNN_TANH"``, ``"RNN_RELU"``, ``"GRU"`` or ``"LSTM"``.
        input: ``[T, B, I]``, time-major.
        weights: per direction ``w_ih [G*H, I]``, ``w_hh [G*H, P]``, then ``b_ih [G*H]``,
            ``b_hh [G*H]`` when ``has_biases``, then ``w_hr [P, H]`` for an LSTM with a
            projection: torch.nn's order (a one-layer module's ``_flat_weights``). G is 1, 3, 4
            for RNN, GRU, LSTM; P is the projection size, or H without one.
        hx: ``[D, B, P]`` initial hidden state, zeros when None (D = 2 if bidirectional).
        cx: ``[D, B, H]`` initial cell state (LSTM only), zeros when None.
        lengths: ``[B]`` integer lengths of the sequences (CPU or the input's device), each in
            ``[0, T]``. Row b then runs steps ``t < lengths[b]`` only: outputs past its end are
            zero, its final state is the one at its own last step, the reverse direction starts
            there, and nothing past the end receives a gradient. Padding must be finite.
        lengths_sorted: no longer has an effect (kept so that calls passing it still work):
            lengths may come in any order, and a batch sorted longest first is never reordered.
        checkpoint_every: bounded memory for long sequences: keep only the state every
            ``checkpoint_every`` steps during forward and recompute the steps in between during
            backward. Backward then holds one segment's intermediate values instead of the
            whole sequence's, for a second forward pass in time. Gradients are the same as
            without it. A bidirectional layer then runs its two directions one after the
            other (the reverse one over a reversed copy of the input), not at once.

    Returns:
        ``output [T, B, D*P]``, ``h_n [D, B, P]`` and ``c_n [D, B, H]`` (LSTM; an empty tensor
        for the other modes). Differentiable with respect to every tensor argument, also
        twice: with ``create_graph=True`` the backward runs through :mod:`rnnext.reference`.

    Autocast: under ``torch.autocast("cuda", dtype)`` the layer runs in ``dtype`` (float16 or
    bfloat16, accumulating in float) and returns ``dtype``; under ``torch.autocast("cpu")`` it
    runs and returns float32 whatever the autocast dtype, as its CPU kernels have no half
    types, except that under bfloat16 autocast its products with the weights take bfloat16
    operands as below (autocast's rule for products). Parameters keep their dtype and get
    gradients in it.

    float16 and bfloat16 on the CPU (a module converted with ``.bfloat16()``, say, which
    torch.nn runs there too): the layer computes in float32 and returns the input's dtype;
    gradients come back in each tensor's own dtype. In bfloat16 (input and weights), on a CPU
    with AVX512-BF16 (:func:`cpu_bf16_products`), the products with the weights and the weight
    gradients' products take their operands (the input, the state, the gate gradients)
    rounded to bfloat16, as torch.nn's bfloat16 layers do, and sum in float32: up to twice the
    float32 speed; the bfloat16 weights go to the op as they are. Everything else stays
    float32, and so do products 16 columns wide or narrower and the initial state's term of
    W_hh's gradient (so how a sequence is split into calls,
    checkpoint segments or streaming chunks, can move the gradients by a rounding step); under
    bfloat16 autocast (float32 weights) also all products of a call of fewer than 4 steps or
    17 rows (T * B).
    """
    _check_device(input)
    # bfloat16 products: for bfloat16 input and weights (a bfloat16 float32 mix keeps its
    # float32 weights unrounded), or under CPU bfloat16 autocast
    on_cpu = input.is_cpu
    bf16_products = on_cpu and (
        (input.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in weights))
        or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    )
    input, hx, cx, weights = _autocast([input, hx, cx, *weights])
    half_on_cpu = on_cpu and input.dtype in (torch.float16, torch.bfloat16)
    if half_on_cpu:
        half = input.dtype
        # bfloat16 weights go to the op as they are: it packs them straight from their bits
        # (a float copy of a large layer's weights per call cost more than its products at
        # short sequences), or makes the float copies itself where its products cannot take
        # bfloat16
        input, hx, cx = [
            t.float() if t is not None and t.dtype == half else t for t in (input, hx, cx)
        ]
        if not bf16_products:
            weights = [t.float() if t.dtype == half else t for t in weights]
    if lengths is not None:
        check_lengths(lengths, input, hx, cx)
    if checkpoint_every is not None:
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(
                f"rnnext: checkpoint_every must be a positive int or None, got {checkpoint_every!r}"
            )
    # (lengths in any order: the op runs its kernels on the batch sorted longest first and
    # returns the results in the caller's order)
    tensors = (input, hx, cx, *weights)
    if _forward_mode(tensors) or _transforms_without_op_rules():
        # Forward-mode AD differentiates the reference's plain ops itself; an autograd
        # Function with a jvp of its own would break torch.compile's graph. (And vmap maps
        # them itself where the ops have no vmap rules.)
        output, h_n, c_n = reference_layer(
            mode, has_biases, bidirectional, bf16_products, lengths, *tensors
        )
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        if torch.jit.is_tracing():
            # the traced graph would hold a Python autograd call that cannot be saved, and
            # the tracer's own check reruns the layer without gradients, down the op path
            raise RuntimeError(
                "rnnext: torch.jit.trace records rnnext layers for inference only: trace under "
                "torch.no_grad() (the graph then calls torch.ops.rnnext.layer_forward), or use "
                "torch.export or torch.compile, which keep gradients"
            )
        if checkpoint_every is not None and input.shape[0] > 0:  # (T = 0: the op's error)
            output, h_n, c_n = _checkpointed_layer(
                mode,
                input,
                weights,
                hx,
                cx,
                has_biases,
                bidirectional,
                lengths,
                checkpoint_every,
                bf16_products,
            )
        else:
            output, h_n, c_n, _ = LayerFunction.apply(
                mode, has_biases, bidirectional, bf16_products, lengths, input, hx, cx, *weights
            )
    else:
        output, h_n, c_n, _ = torch.ops.rnnext.layer_forward(
            mode,
            input,
            list(weights),
            hx,
            cx,
            has_biases,
            bidirectional,
            lengths,
            False,
            bf16_products,
        )
    if half_on_cpu:
        output, h_n, c_n = output.to(half), h_n.to(half), c_n.to(half)
    return output, h_n, c_n


def _checkpointed_layer(
    mode: str,
    input: Tensor,
    weights: Sequence[Tensor],
    hx: Tensor | None,
    cx: Tensor | None,
    has_biases: bool,
    bidirectional: bool,
    lengths: Tensor | None,
    every: int,
    bf16_products: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """A layer with checkpoint_every. A bidirectional layer runs
    its directions one after the other: the reverse one as a forward pass over each sequence
    reversed within its own length, since its segments must be recomputed from the end."""
    directions = 2 if bidirectional else 1
    per_direction = len(weights) // directions

    def direction(d: int) -> tuple[Tensor, Tensor, Tensor]:
        # (a function, so that the reversed output it makes dies on return)
        h0 = hx[d : d + 1] if hx is not None else None
        c0 = cx[d : d + 1] if cx is not None else None
        x = reverse_in_time(input, lengths) if d == 1 else input
        output, h_n, c_n, *_ = CheckpointedLayerFunction.apply(
            mode,
            has_biases,
            bf16_products,
            lengths,
            every,
            x,
            h0,
            c0,
            *weights[d * per_direction : (d + 1) * per_direction],
        )
        return (reverse_in_time(output, lengths) if d == 1 else output), h_n, c_n

    if not bidirectional:
        return direction(0)
    (out_f, h_f, c_f), (out_r, h_r, c_r) = direction(0), direction(1)
    c_n = torch.cat([c_f, c_r]) if mode == "LSTM" else c_f
    return torch.cat([out_f, out_r], dim=2), torch.cat([h_f, h_r]), c_n


def reverse_in_time(x: Tensor, lengths: Tensor | None) -> Tensor:
    """x [T, B, F] with each sequence's steps in reverse order: step t of row b becomes step
    lengths[b] - 1 - t; steps past a row's length stay where they are. Its own inverse."""
    if lengths is None:
        return x.flip(0)
    steps = torch.arange(x.shape[0], device=x.device)[:, None]
    ends = lengths.to(x.device)[None, :]
    source = torch.where(steps < ends, ends - 1 - steps, steps)
    index = source[:, :, None].expand(x.shape)
    if torch.compiler.is_compiling():
        # a plain gather, which the compiler differentiates itself: torch.compile of torch 2.4
        # and 2.5 fails on a second _Permutation after a checkpointed layer in one graph
        return x.gather(0, index)
    return _Permutation.apply(x, 0, index, None)  # (its own inverse)


def select_batch(
    tensors: Sequence[Tensor | None], index: Tensor, inverse: Tensor
) -> list[Tensor | None]:
    """Reorders dimension 1 (the batch of time-major tensors: a PackedSequence's states, by
    its sorted_indices) of each tensor by the permutation ``index``, whose inverse is
    ``inverse``; None and empty tensors (c_n of a GRU, say) stay as they are."""
    # forward-mode AD differentiates index_select itself (the Function has no jvp)
    plain = _forward_mode(tensors)
    return [
        (t.index_select(1, index) if plain else _Permutation.apply(t, 1, index, inverse))
        if t is not None and t.numel()
        else t
        for t in tensors
    ]


class _Permutation(torch.autograd.Function):
    """x reordered along ``dim`` by a permutation: ``index`` 1-D (x.index_select(dim, index):
    a PackedSequence's states, by its sorted_indices) or of x's shape (x.gather(dim, index), a
    permutation of each line along dim: the time reversal of a checkpointed reverse
    direction), with ``inverse`` its inverse (None: index is its own). The gradient goes back
    through the same op with the inverse, where index_select's or gather's own backward fills
    a new tensor of x's size with zeros and adds into it (at [200, 32, 256] float32, 1.4-1.6
    ms against 0.4 for the round trip alone). A gradient that is one value along dim
    (expanded, as from output.sum()) is its own permutation: it passes as it came, still
    expanded, which the kernels' backward reads in place."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, dim, index, inverse):
        return _permuted(x, dim, index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _x, ctx.dim, index, inverse = inputs
        ctx.save_for_backward(index if inverse is None else inverse)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        # (not while compiling: torch.compile of torch 2.4 and 2.5 cannot trace a stride
        # there, and the permuted copy is the same values)
        if not torch.compiler.is_compiling() and grad.stride(ctx.dim) == 0:
            return grad, None, None, None
        return _permuted(grad, ctx.dim, inverse), None, None, None


def _permuted(x: Tensor, dim: int, index: Tensor) -> Tensor:
    return x.index_select(dim, index) if index.dim() == 1 else x.gather(dim, index)


def check_lengths(lengths: Tensor, input: Tensor, hx: Tensor | None, cx: Tensor | None) -> None:
    """Checks lengths against a time-major input (and the states' batch size, dimension 1), in
    Python's words, before any op or the reference sees them."""
    B = input.shape[1] if input.dim() == 3 else None
    if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.shape[0] != B:
        got = list(lengths.shape) if isinstance(lengths, Tensor) else type(lengths).__name__
        raise ValueError(f"rnnext: lengths must be 1-D of size B = {B}, got {got}")
    if lengths.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"rnnext: lengths must be int64 or int32, got {lengths.dtype}")
    for name, state in (("hx", hx), ("cx", cx)):
        if state is not None and (state.dim() != 3 or state.shape[1] != B):
            raise ValueError(
                f"rnnext: {name} must be [D, B = {B}, size], got shape {list(state.shape)}"
            )


# whether autocast is on for any device (one call where torch has it)
_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast(tensors: list[Tensor | None]) -> tuple:
    """Under autocast, the floating tensors in the dtype rnnext runs in there: on CUDA the
    autocast dtype (float16 or bfloat16; the kernels accumulate in float), on the CPU float32,
    since the CPU kernels have no half types. float64 tensors are left alone, as autocast does.
    Casting is differentiable: float32 parameters get float32 gradients."""
    input = tensors[0]
    if not _any_autocast_enabled():
        return tensors[0], tensors[1], tensors[2], tensors[3:]
    device_type = input.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        target = None
    elif device_type == "cuda":
        target = torch.get_autocast_dtype("cuda")
    else:
        target = torch.float32
    if target is not None:
        tensors = [
            t.to(target)
            if t is not None and t.is_floating_point() and t.dtype not in (target, torch.float64)
            else t
            for t in tensors
        ]
    input, hx, cx, *weights = tensors
    return input, hx, cx, weights


def _forward_mode(tensors) -> bool:
    """Whether forward-mode AD differentiates this call: inside torch.func.jvp (jacfwd,
    hessian), or with a dual tensor of torch.autograd.forward_ad among the tensors."""
    if torch.compiler.is_compiling():
        return False
    if any(key.name == "Jvp" for key in functorch_transforms().values()):
        return True
    if getattr(_forward_ad, "_current_level", -1) < 0:  # no dual level open
        return False
    return any(t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _transforms_without_op_rules() -> bool:
    """Whether this call runs under a torch.func transform on a torch whose ops cannot have
    vmap rules (torch 2.4). The layer then runs as rnnext.reference's plain ops, which vmap
    maps itself: the same results, step by step in Python. (Under grad or vjp too, since
    their backward may run under vmap, as torch.func.jacrev runs it.)"""
    if OPS_HAVE_VMAP_RULES or torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active()


def _check_device(input: Tensor) -> None:
    """A clear error for devices this build has no kernels for (the dispatcher's is cryptic)."""
    if input.is_cpu and "cpu" in DEVICES_WITH_KERNELS:  # (input.device costs 0.3 us)
        return
    if input.device.type not in DEVICES_WITH_KERNELS:
        raise NotImplementedError(
            f"rnnext: this build has no kernels for device {input.device.type!r} (input is on "
            f"{input.device}); it runs on: {', '.join(sorted(DEVICES_WITH_KERNELS))}"
        )


def cuda_graph_stats(device: torch.device | str = "cuda") -> dict[str, int]:
    """Process-wide counters of the CUDA graph replay of repeated layer calls.

    A CUDA layer call that repeats an earlier one (same buffers, sizes and lengths, as the
    iterations of a training loop do) replays its time loops as a CUDA graph: the first call
    with a key runs eagerly, the second captures the graph, later ones replay it. Returns
    ``first_sightings`` (calls run eagerly as the first with their key), ``captures``,
    ``failed_captures`` (their keys stay eager) and ``graph_launches``. Needs rnnext built with
    its CUDA part; ``RNNEXT_CUDA_GRAPHS=0`` in the environment turns the replay off.
    """
    if "cuda" not in DEVICES_WITH_KERNELS:
        raise RuntimeError("rnnext: cuda_graph_stats needs rnnext built with its CUDA part")
    counts = torch.ops.rnnext._cuda_graph_stats(torch.empty(0, device=device))
    names = ("first_sightings", "captures", "failed_captures", "graph_launches")
    return dict(zip(names, counts))


def cpu_cache_stats() -> dict[str, int]:
    """Counters of the CPU workspace cache, process-wide.

    On the CPU, the workspace a layer's forward keeps for its backward (and a bidirectional
    layer's per-direction input gradients, the packed copies of the weights that each call
    makes, the weight gradients backward returns, and the copies of the batch in the kernels'
    order that unsorted lengths need), when 256 KB or larger, comes from a
    cache of freed buffers: such a buffer would otherwise often be mapped afresh by the C
    library at every call and pay a page fault per 4 KB written. A call reuses a cached
    buffer of at least its size and at most 5/4 of it. The cache holds at most
    ``RNNEXT_CPU_CACHE_MB`` megabytes (default 1024, ``0`` turns it off), dropping its oldest
    buffers beyond that; what it holds stays allocated until :func:`release_cpu_cache`, and
    ``torch.profiler``'s memory view does not count it. The setting is read at the cache's
    first use; a value that is not a whole number of megabytes makes every use raise a
    RuntimeError that names it: this function, :func:`release_cpu_cache`, and every CPU call
    with a buffer that large.
    Returns ``reused`` (buffers handed out again), ``allocated`` (buffers newly allocated for
    it) and ``cached_bytes`` (held now, free for reuse).
    """
    names = ("reused", "allocated", "cached_bytes")
    return dict(zip(names, _C._cpu_cache_stats()))


def cpu_bf16_products() -> bool:
    """Whether bfloat16 layers on this CPU multiply in bfloat16 (AVX512-BF16's dot products,
    sums in float32; see :func:`recurrent_layer`). Where not, they compute wholly in float32,
    as they also do with the environment variable ``RNNEXT_CPU_BF16_PRODUCTS=0`` (read at
    every call)."""
    from . import _C

    return bool(_C._cpu_bf16_products())


def release_cpu_cache() -> int:
    """Frees the buffers the CPU workspace cache holds (see :func:`cpu_cache_stats`), as
    ``torch.cuda.empty_cache()`` does for CUDA's; returns how many bytes that was. Buffers in
    use are not touched: they go back to the cache when their tensors die."""
    return _C._release_cpu_cache()
