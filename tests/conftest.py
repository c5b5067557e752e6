"""Shared helpers for rnnext's tests."""

from __future__ import annotations

import pytest
import torch

import rnnext

MODES = ["RNN_TANH", "RNN_RELU", "GRU", "LSTM"]
GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def make_module(mode: str, input_size: int, hidden_size: int, *, nn: bool, **kwargs):
    """A torch.nn (nn=True) or rnnext module of the given mode."""
    lib = torch.nn if nn else rnnext
    if mode.startswith("RNN"):
        nonlinearity = "tanh" if mode == "RNN_TANH" else "relu"
        return lib.RNN(input_size, hidden_size, nonlinearity=nonlinearity, **kwargs)
    return getattr(lib, mode)(input_size, hidden_size, **kwargs)


def layer_weights(mode, I, H, *, bias=True, directions=1, dtype=torch.float64, device="cpu"):
    """Random weights in the op's flat order, requiring grad, scaled to keep gates unsaturated."""
    G = GATES[mode]
    weights = []
    for _ in range(directions):
        shapes = [(G * H, I), (G * H, H)] + ([(G * H,), (G * H,)] if bias else [])
        weights += [torch.randn(s, dtype=dtype, device=device) / max(H, I) ** 0.5 for s in shapes]
    return [w.requires_grad_() for w in weights]


def weighted_loss(output, h_n, c_n):
    """A loss that gives every output element its own gradient, so no error can cancel out."""
    gen = torch.Generator(device="cpu").manual_seed(1234)
    total = 0
    for t in (output, h_n, c_n):
        if t.numel():
            weights = torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
            total = total + (t * weights).sum()
    return total


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)
