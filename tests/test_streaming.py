"""Streaming: chunked calls equal one call; truncated BPTT carries state and cuts gradients."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from conftest import MODES, flat, make_module

import rnnext


@pytest.mark.parametrize("mode", MODES)
def test_chunks_equal_one_call(mode):
    torch.manual_seed(0)
    module = make_module(mode, 3, 5, nn=False, num_layers=2, batch_first=True).double()
    x = torch.randn(4, 23, 3, dtype=torch.float64)
    whole_out, whole_state = module(x)
    outputs, state = [], None
    for chunk in rnnext.TruncatedBPTT.split(x, 5, time_dim=1):
        out, state = module(chunk, state)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, dim=1), whole_out)
    torch.testing.assert_close(flat((None, state))[1:], flat((None, whole_state))[1:])


def test_truncated_bptt_carries_state_and_cuts_gradient():
    torch.manual_seed(1)
    lstm = rnnext.LSTM(2, 4).double()
    runner = rnnext.TruncatedBPTT(lstm)
    first = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    second = torch.randn(6, 3, 2, dtype=torch.float64)
    runner(first)
    assert all(not s.requires_grad for s in runner.state)
    out = runner(second)
    expected, _ = lstm(torch.cat([first, second]).detach())
    torch.testing.assert_close(out, expected[6:])  # the state really was carried
    out.sum().backward()
    assert first.grad is None  # the gradient stopped at the chunk border
    assert lstm.weight_hh_l0.grad is not None
    runner.reset()
    torch.testing.assert_close(runner(second), lstm(second)[0])


def test_bidirectional_module_refused():
    with pytest.raises(ValueError, match="module must be unidirectional"):
        rnnext.TruncatedBPTT(rnnext.GRU(2, 3, bidirectional=True))


def test_split_rejects_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        next(rnnext.TruncatedBPTT.split(torch.zeros(3, 2), 0))


def test_long_sequence_example_learns():
    path = pathlib.Path(__file__).parents[1] / "examples" / "long_sequence_tbptt.py"
    spec = importlib.util.spec_from_file_location("long_sequence_tbptt", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    first, last = example.train(steps=20_000, chunk=200, batch=4, hidden=16)
    assert last < 0.5 * first
