"""Shared helpers for rnnext's tests."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnext

MODES = ["RNN_TANH", "RNN_RELU", "GRU", "LSTM"]
GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def full_float32_in_cudnn():
    """torch.nn's float32 RNNs on CUDA run in cuDNN, which by default multiplies in TF32 (a
    10-bit mantissa, errors near 1e-3); rnnext's cuBLAS GEMMs follow
    torch.backends.cuda.matmul.allow_tf32, off by default. Comparisons with torch.nn need
    both in full float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def make_module(mode: str, input_size: int, hidden_size: int, *, nn: bool, **kwargs):
    """A torch.nn (nn=True) or rnnext module of the given mode."""
    lib = torch.nn if nn else rnnext
    if mode.startswith("RNN"):
        nonlinearity = "tanh" if mode == "RNN_TANH" else "relu"
        return lib.RNN(input_size, hidden_size, nonlinearity=nonlinearity, **kwargs)
    return getattr(lib, mode)(input_size, hidden_size, **kwargs)


def layer_weights(
    mode, I, H, *, bias=True, directions=1, proj=0, dtype=torch.float64, device="cpu"
):
    """Random weights in the op's flat order, requiring grad, scaled to keep gates unsaturated.

    proj > 0 gives an LSTM projection of that size (w_hr [proj, H], w_hh [G*H, proj]).
    """
    G = GATES[mode]
    P = proj or H
    weights = []
    for _ in range(directions):
        shapes = [(G * H, I), (G * H, P)] + ([(G * H,), (G * H,)] if bias else [])
        shapes += [(P, H)] if proj else []
        weights += [torch.randn(s, dtype=dtype, device=device) / max(H, I) ** 0.5 for s in shapes]
    return [w.requires_grad_() for w in weights]


def weighted_loss(output, h_n, c_n):
    """A loss that gives every output element its own gradient, so no error can cancel out."""
    gen = torch.Generator(device="cpu").manual_seed(1234)
    total = 0
    for t in (output, h_n, c_n):
        # empty tensors too: the loss of an empty batch is still a differentiable zero
        # drawn in float32 whatever t's dtype, so that a float32 run and its float64 reference
        # weigh their elements alike (draws in another dtype give other numbers)
        weights = torch.randn(t.shape, generator=gen).to(dtype=t.dtype, device=t.device)
        total = total + (t * weights).sum()
    return total


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def module_pair(mode, I, H, dtype=torch.float64, device="cpu", **kwargs):
    """A torch.nn module and an rnnext module loaded with its state_dict."""
    theirs = make_module(mode, I, H, nn=True, **kwargs).to(device=device, dtype=dtype)
    ours = make_module(mode, I, H, nn=False, **kwargs).to(device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def flat(result):
    output, hidden = result
    return [output, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def run_module(module, x, hx, packed_lengths=None):
    """Outputs and the gradients of input, states and every parameter, by name.

    With packed_lengths, x goes in as a PackedSequence (unsorted lengths) and the output comes
    back padded.
    """
    batch_first = getattr(module, "batch_first", False)
    if packed_lengths is None:
        result = flat(module(x, hx))
    else:
        packed = pack_padded_sequence(x, packed_lengths, batch_first, enforce_sorted=False)
        result = flat(module(packed, hx))
        result[0] = pad_packed_sequence(
            result[0], batch_first, total_length=x.shape[1 if batch_first else 0]
        )[0]
    if len(result) == 2:
        result.append(result[0].new_zeros(0))
    leaves = [x] + ([*hx] if isinstance(hx, tuple) else [hx] if hx is not None else [])
    params = [p for _, p in module.named_parameters()]
    g = torch.autograd.grad(weighted_loss(*result), leaves + params)
    names = ["input"] + [f"state{i}" for i in range(len(leaves) - 1)]
    names += [n for n, _ in module.named_parameters()]
    return result, dict(zip(names, g))


def assert_same(theirs, ours, x, hx, packed_lengths=None, **tol):
    """Same outputs, states and gradients (input, states, each parameter) from both modules."""
    ref_out, ref_grads = run_module(theirs, x, hx, packed_lengths)
    out, grads = run_module(ours, x, hx, packed_lengths)
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, **tol)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], **tol, msg=lambda m, name=name: f"{name}: {m}"
        )
