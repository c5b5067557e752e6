"""torch.library.opcheck of every rnnext op: schema, fake kernel, dispatch, aot autograd."""

from __future__ import annotations

import pytest
import torch
from conftest import MODES, layer_weights

import rnnext  # noqa: F401  (registers the ops)


def sample_args(mode, device, bidirectional, proj=0):
    D = 2 if bidirectional else 1
    opts = dict(dtype=torch.float64, device=device)
    x = torch.randn(4, 3, 5, **opts)
    weights = [w.detach() for w in layer_weights(mode, 5, 6, directions=D, proj=proj, **opts)]
    hx = torch.randn(D, 3, proj or 6, **opts)
    cx = torch.randn(D, 3, 6, **opts) if mode == "LSTM" else None
    return x, weights, hx, cx


# (mode, projection size, lengths): every cell, an LSTM projection, lengths with a zero sorted
# longest first and not (which the op reorders)
CASES = [(m, 0, None) for m in MODES] + [
    ("LSTM", 4, None),
    ("GRU", 0, [4, 2, 0]),
    ("LSTM", 0, [2, 4, 0]),
]


@pytest.mark.parametrize("mode, proj, lengths", CASES, ids=str)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("need_workspace", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("bf16_products", [False, True], ids=["float", "bf16"])
def test_layer_forward(mode, proj, lengths, bidirectional, need_workspace, bf16_products, device):
    x, weights, hx, cx = sample_args(mode, device, bidirectional, proj)
    lengths = torch.tensor(lengths) if lengths is not None else None
    args = (mode, x, weights, hx, cx, True, bidirectional, lengths, need_workspace, bf16_products)
    torch.library.opcheck(torch.ops.rnnext.layer_forward.default, args)


@pytest.mark.parametrize("mode, proj, lengths", CASES, ids=str)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize(
    "mask", [(True, True, True), (False, False, True), (True, False, False)], ids=str
)
@pytest.mark.parametrize("bf16_products", [False, True], ids=["float", "bf16"])
def test_layer_backward(mode, proj, lengths, bidirectional, mask, bf16_products, device):
    x, weights, hx, cx = sample_args(mode, device, bidirectional, proj)
    lengths = torch.tensor(lengths) if lengths is not None else None
    fwd = (mode, x, weights, hx, cx, True, bidirectional, lengths, True)
    output, h_n, c_n, workspace = torch.ops.rnnext.layer_forward(*fwd)
    grad_c_n = torch.randn_like(c_n) if mode == "LSTM" else None
    args = (
        mode,
        x,
        weights,
        hx,
        cx,
        output,
        workspace,
        torch.randn_like(output),
        torch.randn_like(h_n),
        grad_c_n,
        True,
        bidirectional,
        lengths,
        list(mask),
        bf16_products,
    )
    torch.library.opcheck(torch.ops.rnnext.layer_backward.default, args)


def test_import_lists_the_ops():
    assert {"layer_forward", "layer_backward"} <= set(dir(torch.ops.rnnext))
