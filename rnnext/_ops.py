"""The rnnext operators and their fake kernels.

``torch.ops.rnnext.layer_forward`` and ``torch.ops.rnnext.layer_backward`` run one recurrent
layer (all time steps, one or both directions); csrc/rnnext.cpp documents their arguments.
The fake kernels give the output shapes without computing, for ``torch.compile`` and
meta tensors, and check what they can see: ranks, sizes, dtypes and devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.rnnext)

GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}
# Floats saved per batch row and step for backward, in units of H (csrc/cells/*.h, kSaved).
SAVED_WIDTH = {"RNN_TANH": 0, "RNN_RELU": 0, "GRU": 4, "LSTM": 5}

Tensor = torch.Tensor

# Resolving the ops once makes them show in dir(torch.ops.rnnext) (the namespace is lazy).
OPS = (torch.ops.rnnext.layer_forward, torch.ops.rnnext.layer_backward)


def _check_like(
    op: str, name: str, t: Tensor, input: Tensor, shape: Sequence[int], dtype=None
) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if dtype is not None and dtype != input.dtype:
        if t.dtype != dtype:
            raise TypeError(
                f"{op}: {name} must be {dtype} like weights[0] (bfloat16 weights with "
                f"bf16_products on the CPU), got {t.dtype}"
            )
    elif t.dtype != input.dtype:
        raise TypeError(f"{op}: {name} must have the input's dtype {input.dtype}, got {t.dtype}")
    if t.device != input.device:
        raise ValueError(
            f"{op}: {name} must be on the input's device {input.device}, got {t.device}"
        )


def _layer_sizes(
    op: str,
    mode: str,
    input: Tensor,
    weights: Sequence[Tensor],
    hx: Tensor | None,
    cx: Tensor | None,
    has_biases: bool,
    bidirectional: bool,
    lengths: Tensor | None,
    bf16_products: bool = False,
) -> tuple[int, int, int, int, int, int]:
    """Checks the shared arguments of both ops; returns (T, B, H, P, D, workspace row). With
    bf16_products and float32 input on the CPU the weights may all be bfloat16."""
    if mode not in GATES:
        raise ValueError(f"rnnext: mode must be one of {list(GATES)}, got {mode!r}")
    if input.dim() != 3:
        raise ValueError(
            f"{op}: input must be 3-D [T, B, I] (time-major), got {input.dim()}-D "
            f"with shape {list(input.shape)}"
        )
    if input.dtype not in (torch.float32, torch.float64) and (
        input.device.type == "cpu" or input.dtype not in (torch.float16, torch.bfloat16)
    ):
        raise TypeError(
            f"{op}: input must be float32 or float64 (float16 and bfloat16 on CUDA), "
            f"got {input.dtype} on {input.device}"
        )
    T, B, I = input.shape
    if T == 0:
        raise ValueError(f"{op}: input must have at least one time step, got shape {[T, B, I]}")
    if len(weights) == 0 or weights[0].dim() != 2 or weights[0].shape[0] == 0:
        got = list(weights[0].shape) if len(weights) else "no weights"
        raise ValueError(f"{op}: weights[0] (w_ih) must be 2-D [G*H, I] with H > 0, got {got}")
    G, D = GATES[mode], 2 if bidirectional else 1
    base = 4 if has_biases else 2
    has_proj = mode == "LSTM" and len(weights) == (base + 1) * D
    if len(weights) != base * D and not has_proj:
        raise ValueError(f"{op}: weights must hold {base * D} tensors, got {len(weights)}")
    per_dir = base + has_proj
    H = weights[0].shape[0] // G
    P = weights[per_dir - 1].shape[0] if has_proj else H
    expected = [(G * H, I), (G * H, P), (G * H,), (G * H,)][:base] + [(P, H)] * has_proj
    bf16_weights = (
        bf16_products
        and input.dtype == torch.float32
        and input.device.type == "cpu"
        and weights[0].dtype == torch.bfloat16
    )
    weight_dtype = torch.bfloat16 if bf16_weights else None
    for d in range(D):
        for k, shape in enumerate(expected):
            w = weights[d * per_dir + k]
            _check_like(op, f"weights[{d * per_dir + k}]", w, input, shape, weight_dtype)
    if hx is not None:
        _check_like(op, "hx", hx, input, (D, B, P))
    if cx is not None:
        if mode != "LSTM":
            raise ValueError(f"{op}: cx must be None for mode {mode!r}")
        _check_like(op, "cx", cx, input, (D, B, H))
    if lengths is not None:
        if lengths.shape != (B,):
            raise ValueError(
                f"{op}: lengths must be 1-D of size B = {B}, got {list(lengths.shape)}"
            )
        if lengths.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{op}: lengths must be int64 or int32, got {lengths.dtype}")
        if lengths.device.type != "cpu" and lengths.device != input.device:
            raise ValueError(
                f"{op}: lengths must be on the CPU or on the input's device {input.device}, "
                f"got {lengths.device}"
            )
    return T, B, H, P, D, SAVED_WIDTH[mode] * H + (H if has_proj else 0)


@torch.library.register_fake("rnnext::layer_forward")
def _layer_forward_fake(
    mode,
    input,
    weights,
    hx,
    cx,
    has_biases,
    bidirectional,
    lengths,
    need_workspace,
    bf16_products=False,
):
    T, B, H, P, D, ws_row = _layer_sizes(
        "rnnext.layer_forward",
        mode,
        input,
        weights,
        hx,
        cx,
        has_biases,
        bidirectional,
        lengths,
        bf16_products,
    )
    output = input.new_empty((T, B, D * P))
    h_n = input.new_empty((D, B, P))
    c_n = input.new_empty((D, B, H) if mode == "LSTM" else (0,))
    workspace = input.new_empty((D, T, B, ws_row) if need_workspace else (0,))
    return output, h_n, c_n, workspace


@torch.library.register_fake("rnnext::layer_backward")
def _layer_backward_fake(
    mode,
    input,
    weights,
    hx,
    cx,
    output,
    workspace,
    grad_output,
    grad_h_n,
    grad_c_n,
    has_biases,
    bidirectional,
    lengths,
    output_mask,
    bf16_products=False,
):
    op = "rnnext.layer_backward"
    T, B, H, P, D, ws_row = _layer_sizes(
        op, mode, input, weights, hx, cx, has_biases, bidirectional, lengths, bf16_products
    )
    _check_like(op, "output", output, input, (T, B, D * P))
    _check_like(op, "workspace", workspace, input, (D, T, B, ws_row))
    for name, t, shape in (
        ("grad_output", grad_output, (T, B, D * P)),
        ("grad_h_n", grad_h_n, (D, B, P)),
        ("grad_c_n", grad_c_n, (D, B, H)),
    ):
        if t is not None:
            _check_like(op, name, t, input, shape)
    need_input, need_state, need_weights = output_mask
    grad_input = input.new_empty(input.shape if need_input else (0,))
    grad_hx = input.new_empty((D, B, P) if need_state else (0,))
    grad_cx = input.new_empty((D, B, H) if need_state and mode == "LSTM" else (0,))
    grad_weights = [w.new_empty(w.shape) for w in weights] if need_weights else []
    return grad_input, grad_hx, grad_cx, grad_weights
