"""Deployment paths: torch.export (with dynamic sizes, saved and loaded), TorchScript tracing
for inference, and ONNX export (run in ONNX Runtime)."""

from __future__ import annotations

import inspect
import io
import warnings

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


def onnx_runtime_outputs(module, args, exporter, **export_kwargs):
    """Exports ``module`` to ONNX with the given exporter ("dynamo" or "torchscript") and
    returns a function that runs the model in ONNX Runtime on tensors, giving tensors."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    dynamo = exporter == "dynamo"
    if dynamo:
        pytest.importorskip("onnxscript")
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        pytest.skip("this torch has one ONNX exporter only")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both exporters warn about torch.nn's RNNs
        torch.onnx.export(module, args, buffer, dynamo=dynamo, **export_kwargs)
    session = onnxruntime.InferenceSession(buffer.getvalue())
    names = [i.name for i in session.get_inputs()]

    def run(*inputs):
        feeds = {name: t.numpy() for name, t in zip(names, inputs)}
        return [torch.from_numpy(a) for a in session.run(None, feeds)]

    return run


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("mode", MODES)
def test_onnx_export_runs_in_onnx_runtime(mode, exporter):
    """ONNX export records torch.nn's recurrent ops on the module's weights, which the
    exporters turn into ONNX's RNN, GRU and LSTM; ONNX Runtime then gives rnnext's results."""
    torch.manual_seed(0)
    module = make_module(mode, 3, 4, nn=False, num_layers=2, bidirectional=True).eval()
    x = torch.randn(6, 2, 3)
    run = onnx_runtime_outputs(module, (x,), exporter)
    with torch.no_grad():
        expected = outputs(module(x))
    got = run(x)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


class WithLengths(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, lengths):
        return self.rnn(x, lengths=lengths)


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_onnx_export_with_lengths_and_dynamic_sizes(mode):
    """With lengths (through torch.nn's packed sequences, TorchScript-based exporter) and
    dynamic batch and time axes, the ONNX model takes other sizes and lengths than the example's
    and gives rnnext's results: zeros past each end, each sequence's own final state."""
    torch.manual_seed(0)
    rnn = make_module(mode, 3, 4, nn=False, bidirectional=True, batch_first=True)
    module = WithLengths(rnn).eval()
    example = (torch.randn(3, 7, 3), torch.tensor([7, 2, 5]))
    axes = {"x": {0: "B", 1: "T"}, "lengths": {0: "B"}}
    run = onnx_runtime_outputs(
        module, example, "torchscript", input_names=["x", "lengths"], dynamic_axes=axes
    )
    for x, lengths in [(torch.randn(4, 9, 3), torch.tensor([9, 4, 1, 6])), example]:
        with torch.no_grad():
            expected = outputs(module(x, lengths))
        assert expected[0][1, lengths[1] :].abs().max() == 0  # the test sees padding
        for a, b in zip(run(x, lengths), expected):
            torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script, in recent torch
def test_script_says_what_works_instead():
    model = torch.nn.Sequential(make_module("LSTM", 3, 4, nn=False))
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile.*torch.onnx.export"):
        torch.jit.script(model)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript-based exporter
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_onnx_export_with_lengths_needs_batched_input():
    pytest.importorskip("onnx")
    module = WithLengths(make_module("GRU", 3, 4, nn=False)).eval()
    with pytest.raises(ValueError, match=r"lengths with a batched 3-D input only, got 2-D"):
        torch.onnx.export(
            module, (torch.randn(5, 3), torch.tensor([4])), io.BytesIO(), dynamo=False
        )
