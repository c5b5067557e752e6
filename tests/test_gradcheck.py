"""float64 gradcheck of the fused layer on tiny sizes: both directions, with and without
biases, LSTM projections and per-sequence lengths."""

from __future__ import annotations

import pytest
import torch
from conftest import MODES, layer_weights

from rnnext import functional

VARIANTS = [
    dict(),
    dict(bidirectional=True),
    dict(bias=False),
    dict(bidirectional=True, lengths=[3, 1, 2]),
]


def _layer_and_inputs(mode, variant, device, checkpoint_every=None):
    """A function of (x, h0, [c0], *weights) running the layer, and those inputs."""
    torch.manual_seed(0)
    T, B, I, H = 3, 3, 3, 2
    bidirectional, bias = variant.get("bidirectional", False), variant.get("bias", True)
    proj = variant.get("proj", 0)
    lengths = torch.tensor(variant["lengths"]) if "lengths" in variant else None
    D = 2 if bidirectional else 1
    opts = dict(dtype=torch.float64, device=device)
    x = torch.randn(T, B, I, **opts, requires_grad=True)
    h0 = torch.randn(D, B, proj or H, **opts, requires_grad=True)
    c0 = torch.randn(D, B, H, **opts, requires_grad=True) if mode == "LSTM" else None
    weights = layer_weights(mode, I, H, bias=bias, directions=D, proj=proj, **opts)
    if mode == "RNN_RELU":
        # keep pre-activations away from relu's kink, where finite differences are undefined
        with torch.no_grad():
            weights[0].abs_()
            x.abs_().add_(0.5)
    inputs = [x, h0] + ([c0] if c0 is not None else []) + weights

    def layer(x, h0, *rest):
        c0, ws = (rest[0], rest[1:]) if mode == "LSTM" else (None, rest)
        return functional.recurrent_layer(
            mode,
            x,
            ws,
            h0,
            c0,
            has_biases=bias,
            bidirectional=bidirectional,
            lengths=lengths,
            checkpoint_every=checkpoint_every,
        )

    return layer, inputs


@pytest.mark.parametrize(
    "mode, variant",
    [(m, v) for m in MODES for v in VARIANTS] + [("LSTM", dict(proj=2, bidirectional=True))],
    ids=str,
)
def test_gradcheck(mode, variant, device):
    assert torch.autograd.gradcheck(*_layer_and_inputs(mode, variant, device))


@pytest.mark.parametrize(
    "mode, variant",
    [(m, v) for m in MODES for v in (dict(), dict(bidirectional=True, lengths=[3, 1, 2]))]
    + [("LSTM", dict(proj=2))],
    ids=str,
)
def test_gradgradcheck(mode, variant, device):
    """Second derivatives (backward with create_graph=True, then backward again)."""
    assert torch.autograd.gradgradcheck(*_layer_and_inputs(mode, variant, device))


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_gradgradcheck_checkpointed(mode, bidirectional):
    variant = dict(lengths=[3, 1, 2], bidirectional=bidirectional)
    layer, inputs = _layer_and_inputs(mode, variant, "cpu", checkpoint_every=2)
    assert torch.autograd.gradgradcheck(layer, inputs)


@pytest.mark.parametrize("mode", MODES)
def test_create_graph_gives_the_fused_gradients(mode):
    """The twice-differentiable path's first derivatives equal the fused kernels'."""
    layer, inputs = _layer_and_inputs(mode, dict(bidirectional=True), "cpu")
    loss = sum((t * t).sum() for t in layer(*inputs))
    fused = torch.autograd.grad(loss, inputs, retain_graph=True)
    differentiable = torch.autograd.grad(loss, inputs, create_graph=True)
    assert all(g.requires_grad for g in differentiable)
    for a, b in zip(differentiable, fused):
        torch.testing.assert_close(a, b)
