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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS + [dict(proj=2, bidirectional=True)], ids=str)
def test_gradcheck(mode, variant, device):
    if "proj" in variant and mode != "LSTM":
        variant = dict(variant, proj=0)
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
            mode, x, ws, h0, c0, has_biases=bias, bidirectional=bidirectional, lengths=lengths
        )

    assert torch.autograd.gradcheck(layer, inputs)
