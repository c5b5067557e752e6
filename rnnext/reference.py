"""Pure-PyTorch, per-step implementation of rnnext's layers: the oracle of the tests.

Written from the cell equations (torch.nn's formulation) with plain tensor operations, one
time step at a time, so it shares no code with the fused kernels or with torch.nn's own RNNs.
Autograd through it gives the reference gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def _bf16(t: Tensor) -> Tensor:
    """t's values rounded to bfloat16, in t's dtype."""
    return t.to(torch.bfloat16).to(t.dtype)


class _Bf16Product(torch.autograd.Function):
    """a @ w^T with both operands rounded to bfloat16, and its gradients as the ops'
    bf16_products makes them: grad_a = bf16(g) @ bf16(w), grad_w = bf16(g)^T @ bf16(a)."""

    @staticmethod
    def forward(a, w):
        return _bf16(a) @ _bf16(w).t()

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, w = inputs
        ctx.save_for_backward(a, w)

    @staticmethod
    def backward(ctx, grad):
        a, w = ctx.saved_tensors
        g = _bf16(grad)
        grad_a = g @ _bf16(w) if ctx.needs_input_grad[0] else None
        grad_w = g.t() @ _bf16(a) if ctx.needs_input_grad[1] else None
        return grad_a, grad_w


def bf16_product(a: Tensor, w: Tensor) -> Tensor:
    """a @ w^T in bfloat16 products, forward and backward (see _Bf16Product)."""
    return _Bf16Product.apply(a, w)


def cell_step(
    mode: str,
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None = None,
    *,
    bf16_products: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One step of one cell. x [B, I], h [B, P], c [B, H]; returns (h', c') (c' None but LSTM).

    w_hr [P, H] projects an LSTM's output: h' = w_hr (o * tanh(c')). bf16_products: the
    products with the weights and their gradients' products in bfloat16 (bf16_product).
    """

    def product(a: Tensor, w: Tensor) -> Tensor:
        return bf16_product(a, w) if bf16_products else a @ w.t()

    gx = product(x, w_ih)
    gh = product(h, w_hh)
    if b_ih is not None:
        gx = gx + b_ih
        gh = gh + b_hh
    if mode == "RNN_TANH":
        return torch.tanh(gx + gh), None
    if mode == "RNN_RELU":
        return torch.relu(gx + gh), None
    if mode == "GRU":
        xr, xz, xn = gx.chunk(3, dim=1)
        hr, hz, hn = gh.chunk(3, dim=1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    if mode == "LSTM":
        i, f, g, o = (gx + gh).chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        return (h_new if w_hr is None else product(h_new, w_hr)), c_new
    raise ValueError(f"mode must be 'RNN_TANH', 'RNN_RELU', 'GRU' or 'LSTM', got {mode!r}")


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
    bf16_products: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as :func:`rnnext.functional.recurrent_layer`, one step at a time.

    With ``lengths``, row b takes part in steps ``t < lengths[b]`` only: its outputs past that
    are zero, its state stops there, and the reverse direction starts at its own last step.
    ``bf16_products``: the products with the weights take their operands rounded to bfloat16,
    and so do the products of their gradients (what the ops' bf16_products does where it
    applies: see csrc/rnnext.cpp).
    """
    T, B, _ = input.shape
    D = 2 if bidirectional else 1
    per_dir = len(weights) // D
    has_proj = per_dir == (4 if has_biases else 2) + 1
    P = weights[1].shape[1]
    H = weights[per_dir - 1].shape[1] if has_proj else P
    steps = torch.arange(T, device=input.device)
    if lengths is None:
        lengths = torch.full((B,), T, device=input.device)
    active = steps[:, None] < lengths.to(input.device)[None, :]  # [T, B]
    outputs, h_last, c_last = [], [], []
    for d in range(D):
        w = list(weights[d * per_dir : (d + 1) * per_dir])
        w_ih, w_hh = w[:2]
        b_ih, b_hh = w[2:4] if has_biases else (None, None)
        w_hr = w[-1] if has_proj else None
        h = hx[d] if hx is not None else input.new_zeros(B, P)
        c = None
        if mode == "LSTM":
            c = cx[d] if cx is not None else input.new_zeros(B, H)
        out = [None] * T
        for t in range(T - 1, -1, -1) if d == 1 else range(T):
            h_new, c_new = cell_step(
                mode, input[t], h, c, w_ih, w_hh, b_ih, b_hh, w_hr, bf16_products=bf16_products
            )
            mask = active[t][:, None]
            out[t] = torch.where(mask, h_new, torch.zeros_like(h_new))
            h = torch.where(mask, h_new, h)
            c = torch.where(mask, c_new, c) if c is not None else None
        outputs.append(torch.stack(out))
        h_last.append(h)
        c_last.append(c)
    output = torch.cat(outputs, dim=2)
    c_n = torch.stack(c_last) if mode == "LSTM" else input.new_empty(0)
    return output, torch.stack(h_last), c_n
