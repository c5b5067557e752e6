"""float64 gradcheck of the fused layer, first and second directions, on tiny sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import MODES, layer_weights

from rnnext import functional


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck(mode, bidirectional, bias, device):
    torch.manual_seed(0)
    T, B, I, H = 3, 2, 3, 2
    D = 2 if bidirectional else 1
    opts = dict(dtype=torch.float64, device=device)
    x = torch.randn(T, B, I, **opts, requires_grad=True)
    h0 = torch.randn(D, B, H, **opts, requires_grad=True)
    c0 = torch.randn(D, B, H, **opts, requires_grad=True) if mode == "LSTM" else None
    weights = layer_weights(mode, I, H, bias=bias, directions=D, **opts)
    if mode == "RNN_RELU":
        # keep pre-activations away from relu's kink, where finite differences are undefined
        with torch.no_grad():
            weights[0].abs_()
            x.abs_().add_(0.5)
    inputs = [x, h0] + ([c0] if c0 is not None else []) + weights

    def layer(x, h0, *rest):
        c0, ws = (rest[0], rest[1:]) if mode == "LSTM" else (None, rest)
        return functional.recurrent_layer(
            mode, x, ws, h0, c0, has_biases=bias, bidirectional=bidirectional
        )

    assert torch.autograd.gradcheck(layer, inputs)
