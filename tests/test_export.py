"""Deployment paths: torch.export (with dynamic sizes, saved and loaded) and TorchScript tracing
for inference."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import MODES, make_module


def outputs(result):
    output, hidden = result
    return [output, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def assert_same_outputs(got, expected):
    for a, b in zip(outputs(got), outputs(expected)):
        torch.testing.assert_close(a, b)


# torch.nn's RNN forward (which rnnext's shares) reassigns _flat_weights; export warns about
# that for torch.nn's own modules too
export_warning = pytest.mark.filterwarnings("ignore:The tensor attributes self._flat_weights")


@export_warning
@pytest.mark.parametrize("mode", MODES)
def test_export_with_dynamic_sizes_saves_and_loads(mode, device):
    torch.manual_seed(0)
    module = make_module(mode, 3, 4, nn=False, num_layers=2, bidirectional=True)
    module = module.to(device).eval()
    example = torch.randn(2, 5, 3, device=device)  # [T, B, I]
    sizes = {0: torch.export.Dim("T", min=2), 1: torch.export.Dim("B", min=2)}
    program = torch.export.export(module, (example,), dynamic_shapes=({**sizes},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)

    x = torch.randn(7, 3, 3, device=device)  # other T and B than the example's
    with torch.no_grad():
        expected = module(x)
    assert_same_outputs(program.module()(x), expected)
    assert_same_outputs(loaded.module()(x), expected)


@export_warning
@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_export_with_lengths_takes_other_lengths(mode, device):
    """The lengths are an input of the exported program, not constants baked into it."""
    torch.manual_seed(0)
    module = make_module(mode, 3, 4, nn=False, bidirectional=True).to(device).eval()
    x = torch.randn(6, 3, 3, device=device)
    program = torch.export.export(module, (x,), {"lengths": torch.tensor([6, 2, 4])})
    for lengths in ([3, 6, 1], [6, 6, 6], [0, 5, 2]):
        lengths = torch.tensor(lengths)
        with torch.no_grad():
            expected = module(x, lengths=lengths)
        assert_same_outputs(program.module()(x, lengths=lengths), expected)


# torch.jit.save and load warn that TorchScript is deprecated in recent torch; the tracer warns
# at torch.nn's input-size check, a constant for a given module
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("mode", MODES)
def test_trace_for_inference_saves_and_loads(mode, device):
    """Traced under no_grad, the graph calls torch.ops.rnnext.layer_forward itself, so it
    saves, loads (with rnnext imported) and takes other sizes than the example's."""
    torch.manual_seed(0)
    module = make_module(mode, 3, 4, nn=False, num_layers=2, batch_first=True).to(device).eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, (torch.randn(2, 5, 3, device=device),))
    assert "rnnext::layer_forward" in str(traced.inlined_graph)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer, map_location=device)

    x = torch.randn(4, 9, 3, device=device)  # [B, T, I], other sizes than the example's
    with torch.no_grad():
        expected = module(x)
        assert_same_outputs(loaded(x), expected)


def test_trace_with_gradients_says_how_to_trace():
    """Traced while gradients are on, the graph would hold a Python autograd call that cannot
    be saved; the error says what works instead."""
    module = make_module("GRU", 3, 4, nn=False)
    with pytest.raises(RuntimeError, match=r"trace under torch.no_grad\(\)"):
        torch.jit.trace(module, (torch.randn(2, 5, 3),))
