"""Pure-PyTorch, per-step implementation of rnnext's layers: the oracle of the tests.

Written from the cell equations (torch.nn's formulation) with plain tensor operations, one
time step at a time, so it shares no code with the fused kernels or with torch.nn's own RNNs.
Autograd through it gives the reference gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def cell_step(
    mode: str,
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """One step of one cell. x [B, I], h and c [B, H]; returns (h', c') (c' None but LSTM)."""
    gx = x @ w_ih.t()
    gh = h @ w_hh.t()
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
        return torch.sigmoid(o) * torch.tanh(c_new), c_new
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
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as :func:`rnnext.functional.recurrent_layer`, one step at a time."""
    T, B, _ = input.shape
    D = 2 if bidirectional else 1
    per_dir = 4 if has_biases else 2
    H = weights[1].shape[1]
    outputs, h_last, c_last = [], [], []
    for d in range(D):
        w = list(weights[d * per_dir : (d + 1) * per_dir]) + [None, None]
        h = hx[d] if hx is not None else input.new_zeros(B, H)
        c = None
        if mode == "LSTM":
            c = cx[d] if cx is not None else input.new_zeros(B, H)
        steps = range(T - 1, -1, -1) if d == 1 else range(T)
        out = [None] * T
        for t in steps:
            h, c = cell_step(mode, input[t], h, c, w[0], w[1], w[2], w[3])
            out[t] = h
        outputs.append(torch.stack(out))
        h_last.append(h)
        c_last.append(c)
    output = torch.cat(outputs, dim=2)
    c_n = torch.stack(c_last) if mode == "LSTM" else input.new_empty(0)
    return output, torch.stack(h_last), c_n
