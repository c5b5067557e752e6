"""torch.compile runs rnnext's modules as one graph, forward and backward."""

from __future__ import annotations

import pytest
import torch
from conftest import MODES, make_module, weighted_loss


def assert_compiled_matches_eager(step, x, module):
    """step(x) -> (output, h_n, c_n), compiled as one graph, gives eager's gradients of x and
    of the module's parameters."""
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    params = [x, *module.parameters()]
    expected = torch.autograd.grad(weighted_loss(*step(x)), params)
    got = torch.autograd.grad(weighted_loss(*compiled(x)), params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_compile_fullgraph_matches_eager(mode, device):
    torch.manual_seed(0)
    module = make_module(mode, 3, 4, nn=False).to(device=device, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=device, requires_grad=True)

    def step(x):
        output, hidden = module(x)
        h_n, c_n = hidden if mode == "LSTM" else (hidden, output.new_zeros(0))
        return output, h_n, c_n

    assert_compiled_matches_eager(step, x, module)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_compile_checkpointed_with_lengths(bidirectional, device):
    """checkpoint_every (a bidirectional layer's reverse direction over reversed sequences)
    and lengths also trace as one graph."""
    torch.manual_seed(0)
    module = make_module("LSTM", 3, 4, nn=False, bidirectional=bidirectional, checkpoint_every=2)
    module = module.to(device=device, dtype=torch.float64)
    x = torch.randn(5, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    lengths = torch.tensor([3, 5, 1])

    def step(x):
        output, (h_n, c_n) = module(x, lengths=lengths)
        return output, h_n, c_n

    assert_compiled_matches_eager(step, x, module)


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_compile_with_dropout_options(mode, device):
    """weight_dropout and variational_dropout in training trace as one graph too; from the
    same seed the compiled step draws the same masks as eager (aot_eager runs torch's own
    random ops)."""
    torch.manual_seed(0)
    options = dict(num_layers=2, dropout=0.5, weight_dropout=0.3, variational_dropout=True)
    module = make_module(mode, 3, 4, nn=False, **options).to(device=device, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=device, requires_grad=True)

    def step(x):
        output, hidden = module(x)
        h_n, c_n = hidden if mode == "LSTM" else (hidden, output.new_zeros(0))
        return output, h_n, c_n

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    params = [x, *module.parameters()]
    results = []
    for run in (step, compiled, step):
        torch.manual_seed(4)
        results.append(torch.autograd.grad(weighted_loss(*run(x)), params))
    expected, got, again = results
    for a, b, c in zip(got, expected, again):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(c, b)
