"""CUDA-only behaviour: half precision against a float64 run, determinism, CUDA graphs (the
caller's and rnnext's own replay of repeated calls), streams and blocked input-side GEMMs. (The
device-parametrised tests elsewhere cover the float64 and float32 maths on CUDA.) Skips cleanly
without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODES, flat, layer_weights, module_pair, weighted_loss

import rnnext
from rnnext import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HALF_TYPES = [torch.float16, torch.bfloat16]


def _outputs_and_grads(module, x, hx, lengths=None):
    """Output, final states and the gradients of input, states and parameters, as float64."""
    x = x.detach().requires_grad_()
    leaves = [s.detach().requires_grad_() for s in (hx if isinstance(hx, tuple) else (hx,))]
    state = tuple(leaves) if isinstance(hx, tuple) else leaves[0]
    result = flat(module(x, state) if lengths is None else module(x, state, lengths=lengths))
    if len(result) == 2:
        result.append(result[0].new_zeros(0))
    grads = torch.autograd.grad(weighted_loss(*result), [x, *leaves, *module.parameters()])
    return [t.detach().double() for t in (*result, *grads)]


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize(
    "mode,kwargs",
    [(m, {}) for m in MODES] + [("LSTM", {"proj_size": 8}), ("GRU", {"bidirectional": True})],
)
def test_half_precision_error_is_like_torch_nn(mode, kwargs, dtype):
    """In float16 and bfloat16, rnnext's error against a float64 run of the same weights is
    at most a small multiple of torch.nn's own error in that dtype (or of the dtype's
    resolution where torch.nn's error happens to be smaller), for outputs, states and every
    gradient."""
    torch.manual_seed(0)
    T, B, I, H = 12, 5, 16, 24
    theirs, ours = module_pair(mode, I, H, dtype=torch.float64, device="cuda", **kwargs)
    D = 2 if kwargs.get("bidirectional") else 1
    P = kwargs.get("proj_size") or H
    opts = dict(dtype=torch.float64, device="cuda")
    x = torch.randn(T, B, I, **opts)
    h0 = torch.randn(D, B, P, **opts) / 2
    hx = (h0, torch.randn(D, B, H, **opts) / 2) if mode == "LSTM" else h0
    exact = _outputs_and_grads(ours, x, hx)
    half_hx = tuple(s.to(dtype) for s in hx) if isinstance(hx, tuple) else hx.to(dtype)
    theirs_half = _outputs_and_grads(theirs.to(dtype), x.to(dtype), half_hx)
    ours_half = _outputs_and_grads(ours.to(dtype), x.to(dtype), half_hx)
    assert ours_half[0].dtype == torch.float64  # (converted for comparison)
    # Errors as relative Euclidean norms: a relu unit whose sign flips under rounding (both
    # implementations meet some) then moves the measure little, where a maximum would jump.
    eps = torch.finfo(dtype).eps
    for k, (want, ref_half, got) in enumerate(zip(exact, theirs_half, ours_half)):
        if want.numel() == 0:
            continue
        scale = want.norm().item()
        their_error = (ref_half - want).norm().item() / scale
        our_error = (got - want).norm().item() / scale
        bound = 4 * max(their_error, 4 * eps)
        assert our_error <= bound, f"tensor {k}: relative error {our_error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("mode", MODES)
def test_deterministic(mode):
    """Identical inputs give bitwise-identical outputs and gradients, call after call."""
    torch.manual_seed(1)
    _, ours = module_pair(mode, 32, 48, dtype=torch.float32, device="cuda", bidirectional=True)
    x = torch.randn(30, 16, 32, device="cuda")
    hx = torch.randn(2, 16, 48, device="cuda")
    hx = (hx, torch.randn(2, 16, 48, device="cuda")) if mode == "LSTM" else hx
    torch.use_deterministic_algorithms(True)
    try:
        first = _outputs_and_grads(ours, x, hx)
        for _ in range(3):
            for a, b in zip(first, _outputs_and_grads(ours, x, hx)):
                assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_capture_and_replay(mode, bidirectional):
    """The forward captures into a CUDA graph; a replay on new input equals an eager call."""
    torch.manual_seed(2)
    _, ours = module_pair(
        mode, 8, 16, dtype=torch.float32, device="cuda", bidirectional=bidirectional
    )
    static_x = torch.randn(10, 4, 8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        ours(static_x)  # warm-up outside the capture, as CUDA graphs require
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = ours(static_x)[0]
    new_x = torch.randn(10, 4, 8, device="cuda")
    static_x.copy_(new_x)
    graph.replay()
    with torch.no_grad():
        torch.testing.assert_close(static_out, ours(new_x)[0])


@pytest.mark.parametrize("mode,bidirectional", [("GRU", True), ("LSTM", False)])
def test_repeated_calls_replay_a_graph(mode, bidirectional, monkeypatch):
    """A forward+backward that repeats an earlier call on the same buffers (as a training loop
    does) replays its time loops as a CUDA graph, which reads the buffers' current contents:
    new values in the same input give, bitwise, the results of eager launches."""
    torch.manual_seed(5)
    _, ours = module_pair(
        mode, 8, 16, dtype=torch.float32, device="cuda", bidirectional=bidirectional
    )
    values = [torch.randn(12, 4, 8, device="cuda") for _ in range(2)]
    lengths = torch.tensor([12, 7, 7, 3])
    x = torch.empty(12, 4, 8, device="cuda")

    def call(k):
        x.copy_(values[k])
        leaf = x.detach().requires_grad_()
        result = flat(ours(leaf, lengths=lengths))
        if len(result) == 2:
            result.append(result[0].new_zeros(0))
        grads = torch.autograd.grad(weighted_loss(*result), [leaf, *ours.parameters()])
        return [*result, *grads]

    monkeypatch.setenv("RNNEXT_CUDA_GRAPHS", "0")
    eager = [[t.detach().clone() for t in call(k)] for k in range(2)]
    monkeypatch.setenv("RNNEXT_CUDA_GRAPHS", "1")

    before = rnnext.functional.cuda_graph_stats()
    for k in (0, 1) * 4:
        # compared and dropped inside the loop body: no result outlives its call, so that the
        # caching allocator hands the next call the same blocks, as in a training loop
        for want, got in zip(eager[k], call(k)):
            assert torch.equal(want, got)
        del want, got
    after = rnnext.functional.cuda_graph_stats()
    count = {name: after[name] - before[name] for name in after}
    # each of the forward and the backward: eager at first sight, captured at the second
    # (and launched), replayed at each later call
    assert count["failed_captures"] == 0
    assert count["captures"] >= 2
    assert count["graph_launches"] >= 10


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_replay_keeps_calls_with_and_without_state_gradients_apart(mode, monkeypatch):
    """Without a wanted gradient of h0, backward leaves out the first step's product that
    would give it, so a call that wants it must not replay the graph of one that does not:
    alternating the two on the same buffers gives, bitwise, the results of eager launches."""
    torch.manual_seed(6)
    _, ours = module_pair(mode, 8, 16, dtype=torch.float32, device="cuda")
    x = torch.randn(12, 4, 8, device="cuda")
    state = [torch.randn(1, 4, 16, device="cuda") for _ in range(2 if mode == "LSTM" else 1)]

    def call(state_grad):
        leaf = x.detach().requires_grad_()
        leaves = [s.detach().requires_grad_(state_grad) for s in state]
        result = flat(ours(leaf, tuple(leaves) if mode == "LSTM" else leaves[0]))
        if len(result) == 2:
            result.append(result[0].new_zeros(0))
        wanted = [leaf, *(leaves if state_grad else []), *ours.parameters()]
        return [*result, *torch.autograd.grad(weighted_loss(*result), wanted)]

    monkeypatch.setenv("RNNEXT_CUDA_GRAPHS", "0")
    eager = {wanted: [t.detach().clone() for t in call(wanted)] for wanted in (False, True)}
    monkeypatch.setenv("RNNEXT_CUDA_GRAPHS", "1")
    before = rnnext.functional.cuda_graph_stats()
    # repeats of one kind capture and replay its graph; the call after them that differs only
    # in the wanted gradients meets buffers that the caching allocator likely hands out again
    for wanted in (False,) * 3 + (True,) * 3 + (False, True) * 2:
        got = call(wanted)
        assert len(got) == len(eager[wanted])
        for want, value in zip(eager[wanted], got):
            assert torch.equal(want, value)
        del got, want, value
    after = rnnext.functional.cuda_graph_stats()
    assert after["failed_captures"] == before["failed_captures"]
    assert after["graph_launches"] > before["graph_launches"]  # repeated calls did replay


@pytest.mark.parametrize("block_steps", [None, "3"], ids=["one_block", "blocks"])
@pytest.mark.parametrize("graphs", ["0", "1"])
@pytest.mark.parametrize("mode", MODES)
def test_directions_on_two_streams_match_one_stream(mode, graphs, block_steps, monkeypatch):
    """The two directions of a bidirectional layer, run at once on two streams (eagerly and,
    with graphs, captured and replayed), give bitwise the results of running them one after
    the other on one stream: outputs, states and every gradient, with lengths, a projection
    for the LSTM, and in one block of steps or several."""
    torch.manual_seed(6)
    if block_steps is not None:
        monkeypatch.setenv("RNNEXT_CUDA_BLOCK_STEPS", block_steps)
    proj = {"proj_size": 6} if mode == "LSTM" else {}
    _, ours = module_pair(
        mode, 8, 16, dtype=torch.float32, device="cuda", bidirectional=True, **proj
    )
    x = torch.randn(13, 5, 8, device="cuda")
    lengths = torch.tensor([13, 9, 9, 4, 0])
    monkeypatch.setenv("RNNEXT_CUDA_GRAPHS", graphs)

    def call():
        leaf = x.detach().requires_grad_()
        result = flat(ours(leaf, lengths=lengths))
        if len(result) == 2:
            result.append(result[0].new_zeros(0))
        grads = torch.autograd.grad(weighted_loss(*result), [leaf, *ours.parameters()])
        return [t.detach().clone() for t in (*result, *grads)]

    monkeypatch.setenv("RNNEXT_CUDA_PARALLEL_DIRECTIONS", "0")
    one_stream = call()
    monkeypatch.setenv("RNNEXT_CUDA_PARALLEL_DIRECTIONS", "1")
    before = rnnext.functional.cuda_graph_stats()
    for _ in range(6):
        # compared and dropped inside the loop body, so that the caching allocator hands the
        # next call the same blocks and, with graphs, the calls capture and replay
        for want, got in zip(one_stream, call()):
            assert torch.equal(want, got)
        del want, got
    after = rnnext.functional.cuda_graph_stats()
    if graphs == "1":
        count = {name: after[name] - before[name] for name in after}
        assert count["failed_captures"] == 0
        assert count["captures"] >= 2  # the forward and the backward, two streams each
        assert count["graph_launches"] >= 4


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_side_stream(mode, bidirectional):
    """Work queued on a non-default stream gives the default stream's results."""
    torch.manual_seed(3)
    _, ours = module_pair(
        mode, 8, 16, dtype=torch.float64, device="cuda", bidirectional=bidirectional
    )
    x = torch.randn(9, 3, 8, dtype=torch.float64, device="cuda")
    expected = ours(x)[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = ours(x)[0]
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("mode", MODES)
def test_blocked_input_gemms_and_device_lengths(mode, monkeypatch):
    """Input-side GEMMs in blocks of 3 steps, lengths given on the GPU, both directions,
    projection for LSTM: the same results and gradients as the reference."""
    monkeypatch.setenv("RNNEXT_CUDA_BLOCK_STEPS", "3")
    torch.manual_seed(4)
    T, B, I, H = 11, 5, 6, 7
    proj = 4 if mode == "LSTM" else 0
    P = proj or H
    opts = dict(dtype=torch.float64, device="cuda")
    weights = layer_weights(mode, I, H, directions=2, proj=proj, **opts)
    x = torch.randn(T, B, I, **opts, requires_grad=True)
    hx = torch.randn(2, B, P, **opts, requires_grad=True)
    cx = torch.randn(2, B, H, **opts, requires_grad=True) if mode == "LSTM" else None
    lengths = torch.tensor([11, 3, 9, 0, 5], device="cuda")
    args = (mode, x, weights, hx, cx)
    kw = dict(bidirectional=True, lengths=lengths)
    ours = rnnext.functional.recurrent_layer(*args, **kw)
    ref = reference.recurrent_layer(*args, **kw)
    leaves = [x, hx] + ([cx] if cx is not None else []) + weights
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    for a, b in zip(
        torch.autograd.grad(weighted_loss(*ours), leaves),
        torch.autograd.grad(weighted_loss(*ref), leaves),
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "mode,kwargs",
    [("RNN_TANH", {}), ("GRU", {"bidirectional": True}), ("LSTM", {"proj_size": 64})],
)
def test_small_batch_float32_matches_float64(mode, kwargs):
    """float32 with few rows per step, where the forward's products go through cuBLASLt
    (csrc/cuda/lt_gemm.h): outputs, states and every gradient agree with a float64 run of the
    same weights, for a batch of 8 and for a batch of 24 whose lengths leave fewer than 16 rows
    in the late steps, over three calls each (the first eager, later ones replayed). (Whether
    cuBLASLt ran shows in benchmarks/cuda_long_steps.py's kernel times; this checks the
    results. RNN_RELU is left out: a pre-activation within rounding of 0 flips its derivative.)"""
    torch.manual_seed(5)
    T, I, H = 40, 128, 128
    D = 2 if kwargs.get("bidirectional") else 1
    P = kwargs.get("proj_size") or H
    _, ours = module_pair(mode, I, H, dtype=torch.float32, device="cuda", **kwargs)
    exact = copy.deepcopy(ours).double()
    for B, lengths in ((8, None), (24, torch.randint(1, T + 1, (24,)))):
        x = torch.randn(T, B, I, device="cuda")
        h0 = torch.randn(D, B, P, device="cuda") / 2
        hx = (h0, torch.randn(D, B, H, device="cuda") / 2) if mode == "LSTM" else h0
        hx64 = tuple(s.double() for s in hx) if mode == "LSTM" else h0.double()
        want = _outputs_and_grads(exact, x.double(), hx64, lengths=lengths)
        for call in range(3):
            got = _outputs_and_grads(ours, x, hx, lengths=lengths)
            for k, (g, w) in enumerate(zip(got, want)):
                if w.numel() == 0:
                    continue
                error = (g - w).norm().item() / max(w.norm().item(), 1e-30)
                assert error < 1e-5, f"B={B}, call {call}, tensor {k}: relative error {error:.3g}"
