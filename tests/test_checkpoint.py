"""checkpoint_every: periodic state checkpoints and recomputation give the same gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import MODES, flat, layer_weights, make_module, weighted_loss

from rnnext import functional


@pytest.mark.parametrize("mode, proj", [(m, 0) for m in MODES] + [("LSTM", 3)], ids=str)
@pytest.mark.parametrize("every", [1, 4, 11, 100])
@pytest.mark.parametrize("lengths", [None, [11, 2, 7, 0], [3, 11, 0, 8]], ids=str)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_recompute_gives_the_same_gradients(mode, proj, every, lengths, bidirectional):
    torch.manual_seed(0)
    T, B, I, H = 11, 4, 3, 5
    D = 2 if bidirectional else 1
    opts = dict(dtype=torch.float64)
    x = torch.randn(T, B, I, **opts, requires_grad=True)
    weights = layer_weights(mode, I, H, proj=proj, directions=D)
    h0 = torch.randn(D, B, proj or H, **opts, requires_grad=True)
    c0 = torch.randn(D, B, H, **opts, requires_grad=True) if mode == "LSTM" else None
    lengths = torch.tensor(lengths) if lengths is not None else None
    inputs = [t for t in (x, h0, c0, *weights) if t is not None]
    results = []
    for checkpoint_every in (None, every):
        out = functional.recurrent_layer(
            mode,
            x,
            weights,
            h0,
            c0,
            bidirectional=bidirectional,
            lengths=lengths,
            checkpoint_every=checkpoint_every,
        )
        results.append(list(out) + list(torch.autograd.grad(weighted_loss(*out), inputs)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_module_option(mode, bidirectional, device):
    torch.manual_seed(1)
    opts = dict(nn=False, num_layers=2, bidirectional=bidirectional)
    plain = make_module(mode, 3, 4, **opts).to(device, torch.float64)
    bounded = make_module(mode, 3, 4, **opts, checkpoint_every=3).to(device, torch.float64)
    bounded.load_state_dict(plain.state_dict())
    assert "checkpoint_every=3" in repr(bounded)
    x = torch.randn(10, 3, 3, dtype=torch.float64, device=device)
    lengths = torch.tensor([10, 4, 7])  # unsorted: the reverse direction starts at each end
    grads = []
    for module in (plain, bounded):
        out = flat(module(x, lengths=lengths))
        loss = weighted_loss(*(out + ([] if mode == "LSTM" else [x.new_zeros(0)])))
        grads.append(torch.autograd.grad(loss, list(module.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bad_values():
    x = torch.randn(5, 2, 3)
    weights = layer_weights("GRU", 3, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int or None, got 0"):
        functional.recurrent_layer("GRU", x, weights, checkpoint_every=0)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_no_time_steps(bidirectional):
    """An input of T = 0 gets the op's error, as without checkpoints (the segment loop would
    otherwise run no segment and return nothing)."""
    weights = layer_weights("GRU", 3, 4, directions=2 if bidirectional else 1)
    x = torch.randn(0, 2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="input must have at least one time step"):
        functional.recurrent_layer(
            "GRU", x, weights, bidirectional=bidirectional, checkpoint_every=2
        )
