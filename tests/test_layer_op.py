"""The fused layer op against the per-step reference: outputs, final states, every gradient."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import MODES, layer_weights, weighted_loss

from rnnext import functional, reference

# (T, B, I, H): T=1, B=1, H=1, I != H, and a few ordinary shapes.
SHAPES = [(1, 1, 1, 1), (1, 4, 3, 2), (6, 1, 5, 3), (5, 3, 4, 6), (9, 2, 7, 7), (3, 5, 1, 8)]


def run_both(mode, x, weights, h0, c0, bias, bidirectional, lengths=None, loss=weighted_loss):
    inputs = [t for t in (x, h0, c0, *weights) if t is not None and t.requires_grad]
    results = []
    for impl in (functional, reference):
        out = impl.recurrent_layer(
            mode, x, weights, h0, c0, has_biases=bias, bidirectional=bidirectional, lengths=lengths
        )
        results.append((out, torch.autograd.grad(loss(*out), inputs)))
    return results


def assert_matches(mode, x, weights, h0, bidirectional, lengths, loss=weighted_loss):
    """float32: assert_float32_matches; float64: the reference's results and gradients to
    float64's default tolerances."""
    if x.dtype == torch.float32:
        assert_float32_matches(mode, x, weights, h0, bidirectional, lengths, loss)
        return
    (ours, our_grads), (ref, ref_grads) = run_both(
        mode, x, weights, h0, None, True, bidirectional, lengths, loss
    )
    for a, b in zip(ours + our_grads, ref + ref_grads):
        torch.testing.assert_close(a, b)


def assert_float32_matches(mode, x, weights, h0, bidirectional, lengths, loss=weighted_loss):
    """rnnext in float32 against the float64 reference, the exact answer: ours may differ from
    it by a few times the float32 reference's own error, plus a few float32 ulps of the
    result's scale. Outputs, states and the gradients of x, h0 and every weight."""
    (ours, our_grads), (ref, ref_grads) = run_both(
        mode, x, weights, h0, None, True, bidirectional, lengths, loss
    )
    leaves = [t.detach().double().requires_grad_() for t in (x, h0, *weights) if t is not None]
    exact_h0 = leaves[1] if h0 is not None else None
    exact_weights = leaves[2:] if h0 is not None else leaves[1:]
    exact = reference.recurrent_layer(
        mode,
        leaves[0],
        exact_weights,
        exact_h0,
        None,
        bidirectional=bidirectional,
        lengths=lengths,
    )
    exact_grads = torch.autograd.grad(loss(*exact), leaves)
    for a, b, e in zip(ours + our_grads, ref + ref_grads, exact + exact_grads):
        assert a.dtype == torch.float32 and a.shape == e.shape
        if e.numel() == 0:
            continue
        float32_error = (b.double() - e).abs().max().item()
        ulps = 8 * torch.finfo(torch.float32).eps * e.abs().max().item()
        assert (a.double() - e).abs().max().item() <= 4 * float32_error + ulps


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "noh0"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_matches_reference(mode, shape, bias, with_state, bidirectional, device):
    torch.manual_seed(0)
    T, B, I, H = shape
    D = 2 if bidirectional else 1
    opts = dict(dtype=torch.float64, device=device)
    x = torch.randn(T, B, I, **opts, requires_grad=True)
    weights = layer_weights(mode, I, H, bias=bias, directions=D, **opts)
    h0 = torch.randn(D, B, H, **opts, requires_grad=True) if with_state else None
    c0 = torch.randn(D, B, H, **opts, requires_grad=True) if with_state and mode == "LSTM" else None
    (ours, our_grads), (ref, ref_grads) = run_both(mode, x, weights, h0, c0, bias, bidirectional)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    assert len(our_grads) == len(ref_grads)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "mode, proj", [(m, 0) for m in MODES] + [("LSTM", 2), ("LSTM", 7)], ids=str
)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize(
    "lengths", [None, [6, 6, 4, 1, 1], [3, 6, 0, 1, 6], [0, 0, 0, 0, 0]], ids=str
)
@pytest.mark.parametrize("state_grad", [True, False], ids=["state_grad", "state_fixed"])
def test_lengths_and_projection_match_reference(
    mode, bidirectional, proj, lengths, state_grad, device
):
    """Per-sequence lengths (unsorted, zero, all padding) and LSTM projections, smaller and
    larger than H, against the reference: outputs, states and every gradient. A fixed initial
    state (no gradient wanted) still enters dW_hh, while backward skips the product that would
    only give its gradient at each row's first step."""
    torch.manual_seed(3)
    T, B, I, H = 6, 5, 4, 5
    D, P = 2 if bidirectional else 1, proj or H
    opts = dict(dtype=torch.float64, device=device)
    x = torch.randn(T, B, I, **opts, requires_grad=True)
    weights = layer_weights(mode, I, H, directions=D, proj=proj, **opts)
    h0 = torch.randn(D, B, P, **opts, requires_grad=state_grad)
    c0 = torch.randn(D, B, H, **opts, requires_grad=state_grad) if mode == "LSTM" else None
    lengths = torch.tensor(lengths) if lengths is not None else None
    (ours, our_grads), (ref, ref_grads) = run_both(
        mode, x, weights, h0, c0, True, bidirectional, lengths
    )
    for a, b in zip(ours + our_grads, ref + ref_grads):
        torch.testing.assert_close(a, b)
    if lengths is not None:
        steps = torch.arange(T)[:, None]
        past_end = (steps >= lengths[None, :]).to(device)
        assert ours[0][past_end].abs().sum() == 0  # outputs past each end are zero
        assert our_grads[0][past_end].abs().sum() == 0  # and the input there gets no gradient


@pytest.mark.parametrize("block_steps", ["1", "3", "4"])
@pytest.mark.parametrize("mode, proj", [(m, 0) for m in MODES] + [("LSTM", 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_blocked_input_gemms(mode, proj, block_steps, dtype, monkeypatch):
    """Long sequences run their input-side GEMMs in blocks of steps: many blocks, with a
    partial last one, both directions and lengths (which make the blocks' buffers compact),
    give the reference's results (through the packed kernel from 4 steps on, in either dtype)."""
    monkeypatch.setenv("RNNEXT_CPU_BLOCK_STEPS", block_steps)
    torch.manual_seed(4)
    T, B, I, H = 11, 4, 3, 5
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
    weights = layer_weights(mode, I, H, directions=2, proj=proj, dtype=dtype)
    h0 = torch.randn(2, B, proj or H, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([11, 6, 0, 9])
    for lens in (None, lengths):
        assert_matches(mode, x, weights, h0, True, lens)


# (mode, T, B, I, H, proj, bidirectional, lengths, with h0, RNNEXT_CPU_BLOCK_STEPS, team split):
# T = 1 with h0 (no step of W_hh's gradient in the loop, only the h0 term), narrow input,
# projection, lengths with a zero, several blocks, packed products, teams by units and by rows
UNSET_CASES = [
    ("RNN_TANH", 1, 4, 8, 8, 0, False, None, True, None, None),
    ("GRU", 1, 3, 5, 6, 0, False, None, False, None, None),
    ("LSTM", 7, 5, 3, 6, 3, True, [7, 0, 4, 2, 7], True, "2", None),
    ("GRU", 9, 20, 40, 32, 0, True, [9, 3, 9, 1] * 5, False, "3", "units"),
    ("LSTM", 9, 20, 40, 32, 0, False, None, True, "4", "rows"),
    ("RNN_TANH", 6, 20, 128, 128, 0, False, None, True, "4", None),
    ("RNN_RELU", 5, 4, 6, 8, 0, True, [5, 2, 0, 4], False, None, None),
]


@pytest.mark.parametrize("case", UNSET_CASES, ids=lambda c: "-".join(map(str, c[:5])))
def test_weight_gradients_from_dirty_memory(case, monkeypatch):
    """CPU backward adds its blocks' weight gradients into buffers that may come back from
    the buffer cache with an earlier call's contents: they are zeroed first. With
    uninitialised memory filled with NaN (torch's deterministic fill for at::empty, and NaN
    gradients of an earlier call left in the cache for its 256 KB buffers), every gradient
    still matches the reference."""
    mode, T, B, I, H, proj, bidirectional, lengths, with_h0, block_steps, split = case
    if block_steps is not None:
        monkeypatch.setenv("RNNEXT_CPU_BLOCK_STEPS", block_steps)
    if split is not None:
        monkeypatch.setenv("RNNEXT_CPU_TEAM_SPLIT", split)
    torch.manual_seed(12)
    D = 2 if bidirectional else 1
    weights = layer_weights(mode, I, H, directions=D, proj=proj)
    h0 = torch.randn(D, B, proj or H, dtype=torch.float64, requires_grad=True) if with_h0 else None
    lengths = torch.tensor(lengths) if lengths is not None else None
    poisoned = torch.full((T, B, I), float("nan"), dtype=torch.float64)
    out = functional.recurrent_layer(
        mode, poisoned, weights, h0, bidirectional=bidirectional, lengths=lengths
    )
    grads = torch.autograd.grad(weighted_loss(*out), weights)
    assert grads[0].isnan().all()  # (dW_ih = dG^T x)
    del out, grads  # (their buffers go back to the cache)
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
        assert_matches(mode, x, weights, h0, bidirectional, lengths)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def cache_counts(call, calls: int) -> list[tuple[int, int]]:
    """Runs call(k) for k < calls; per call, the buffers the CPU cache newly allocated and the
    ones it handed out again."""
    counts = []
    for k in range(calls):
        before = functional.cpu_cache_stats()
        call(k)
        after = functional.cpu_cache_stats()
        counts.append(
            (after["allocated"] - before["allocated"], after["reused"] - before["reused"])
        )
    return counts


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_cpu_workspace_cache(mode):
    """CPU: buffers of 256 KB or more (the workspace, a bidirectional layer's per-direction
    input gradients, the weights' packed copies and the weight gradients) come from a cache of
    freed buffers. A second call gets every one of the first call's buffers back, with their
    old contents (the weight gradients are zeroed again), allocates nothing new, and still
    matches the reference; release_cpu_cache frees what the cache holds."""
    functional.release_cpu_cache()
    torch.manual_seed(10)
    T, B, I, H = 32, 16, 512, 128  # float64: workspace >= 4 MB, [2, T, B, I] = 4 MB
    weights = layer_weights(mode, I, H, directions=2, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,))
    # (sorted: lengths in another order need buffers for the reordered batch too)
    sorted_lengths = lengths.sort(descending=True).values

    def call(k):
        x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
        assert_matches(mode, x, weights, None, True, sorted_lengths if k else None)

    (allocated, reused), second = cache_counts(call, 2)
    # workspace, grad_x, and 2 directions x 2 weight gradients of 256 KB or more at least
    assert allocated >= 6
    assert second == (0, allocated + reused)

    # lengths in another order: the reordered copies of the input, the output and the output
    # gradient, the output in the kernels' order and the input gradient in it come from the
    # cache too, and come back on the next call
    def unsorted_call(k):
        x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
        assert_matches(mode, x, weights, None, True, lengths if k else sorted_lengths)

    (_, sorted_reused), (unsorted_allocated, unsorted_reused), again = cache_counts(
        unsorted_call, 3
    )
    assert sorted_reused == allocated + reused
    assert unsorted_allocated + unsorted_reused >= allocated + reused + 5
    assert again == (0, unsorted_allocated + unsorted_reused)
    workspace = 2 * T * B * (5 if mode == "LSTM" else 4) * H * 8
    assert functional.release_cpu_cache() >= workspace + 2 * T * B * I * 8
    assert functional.cpu_cache_stats()["cached_bytes"] == 0
    assert functional.release_cpu_cache() == 0


def test_cpu_packed_weights_cached():
    """CPU: a weight's packed copy of 256 KB or more comes from the same cache (LSTM, I = H =
    512, float32: each of W_ih and W_hh, packed for forward or for backward, is 4 MB), and so
    do the weight gradients (4 MB each too). The forward's packed copies are freed when it
    returns, so backward's reuse them, and a second call reuses every buffer, with its old
    contents, and still matches the reference."""
    functional.release_cpu_cache()
    torch.manual_seed(11)
    T, B, I, H = 4, 5, 512, 512  # 20 rows: packed
    weights = layer_weights("LSTM", I, H, dtype=torch.float32)

    def call(k):
        assert_matches("LSTM", torch.randn(T, B, I, requires_grad=True), weights, None, False, None)

    counts = cache_counts(call, 2)
    # forward packs 2 (new), backward 2 (reused) and makes 2 weight gradients (new)
    assert counts[0] == (4, 2)
    assert counts[1] == (0, 6)
    assert functional.release_cpu_cache() >= 4 * 4 * H * I * 4


def run_with_cache_setting(value: str, first: str = "") -> subprocess.CompletedProcess:
    """A bidirectional LSTM forward+backward (a 5 MB workspace) in a fresh process with
    RNNEXT_CPU_CACHE_MB=value, which prints the cache's counters; `first` is a statement run
    before the layer."""
    script = (
        "import torch, rnnext\n"
        + (first + "\n" if first else "")
        + "m = rnnext.LSTM(128, 128, bidirectional=True)\n"
        "out, _ = m(torch.randn(64, 16, 128, requires_grad=True))\n"
        "out.sum().backward()\n"
        "print(rnnext.functional.cpu_cache_stats())\n"
    )
    env = {**os.environ, "RNNEXT_CPU_CACHE_MB": value}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)


def test_cpu_workspace_cache_off():
    """RNNEXT_CPU_CACHE_MB=0 turns the cache off: nothing is allocated for it or kept."""
    result = run_with_cache_setting("0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'reused': 0, 'allocated': 0, 'cached_bytes': 0}"


@pytest.mark.parametrize("value", ["lots", "-1", "12MB"])
@pytest.mark.parametrize(
    "first",
    ["", "rnnext.functional.cpu_cache_stats()", "rnnext.functional.release_cpu_cache()"],
    ids=["layer_first", "stats_first", "release_first"],
)
def test_cpu_workspace_cache_setting_checked(value, first):
    """A setting that is not a whole number of megabytes is a Python RuntimeError that names
    it, whether a layer, cpu_cache_stats() or release_cpu_cache() uses the cache first (never
    a crash)."""
    result = run_with_cache_setting(value, first)
    assert result.returncode == 1, result.stderr
    assert "RuntimeError" in result.stderr
    assert "RNNEXT_CPU_CACHE_MB must be a whole number of megabytes" in result.stderr
    assert f"got '{value}'" in result.stderr


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("threads", [2, 3], ids=lambda n: f"threads{n}")
@pytest.mark.parametrize("at_once", [None, "0", "1"], ids=["auto", "in_turn", "at_once"])
def test_bidirectional_threads(mode, threads, at_once, monkeypatch):
    """CPU: the directions of a bidirectional layer run at once, a thread each, when that uses
    every thread (2 threads), else one after the other, each on every thread (3 threads, as on
    a larger machine); RNNEXT_CPU_PARALLEL_DIRECTIONS forces either. Each way matches the
    reference, with teams by units and by rows inside a direction."""
    if at_once is not None:
        monkeypatch.setenv("RNNEXT_CPU_PARALLEL_DIRECTIONS", at_once)
    monkeypatch.setenv("RNNEXT_CPU_BLOCK_STEPS", "3")
    torch.manual_seed(9)
    T, I, H = 7, 20, 64
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # 5 rows: by units; 24 and 25: by rows, with all rows active (on 3 threads, one
        # product per thread and block for 24, step by step for 25) and with lengths
        cases = ((5, None), (24, None), (25, None), (24, torch.randint(0, T + 1, (24,))))
        for batch, lengths in cases:
            x = torch.randn(T, batch, I, dtype=torch.float64, requires_grad=True)
            weights = layer_weights(mode, I, H, directions=2, dtype=torch.float64)
            h0 = torch.randn(2, batch, H, dtype=torch.float64, requires_grad=True)
            assert_matches(mode, x, weights, h0, True, lengths)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("threads", [1, 2, 3], ids=lambda n: f"threads{n}")
@pytest.mark.parametrize("batch", [5, 24], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_threads_share_hidden_units(mode, threads, batch, dtype, monkeypatch):
    """CPU, H a multiple of the packed tile (32 floats, 16 doubles): the threads run a
    direction's whole time loop together, each on its own tiles of hidden units, meeting at a
    barrier per step; backward they also share the columns of dx and of the weight gradients
    (packed products). Uneven shares (3 tiles of units, an input tile and a partial one),
    several blocks of steps, lengths, output gradients with permuted strides (gathered by
    each thread for its units) and expanded ones (a value per step, a value per step and row),
    and 1 to 3 threads (3 on a 2-core machine: more threads than cores), at 5 and 24 rows."""
    monkeypatch.setenv("RNNEXT_CPU_BLOCK_STEPS", "3")
    torch.manual_seed(8)
    T, B, I, H = 10, batch, 40, 96
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
    weights = layer_weights(mode, I, H, dtype=dtype)
    h0 = torch.randn(1, B, H, dtype=dtype, requires_grad=True)
    # d loss / d output, stored [H, B, T]: every stride of the time-major view differs from 1
    grad_out = torch.randn(H, B, T).permute(2, 1, 0)

    def permuted_loss(output, h_n, c_n):
        return (output * grad_out.to(output.dtype)).sum() + h_n.sum()

    # gradients that arrive expanded: one value per step, and one per step and row
    expanded = [
        torch.randn(T, 1, 1, dtype=dtype).expand(T, B, H),
        torch.randn(T, B, 1, dtype=dtype).expand(T, B, H),
    ]
    expanded_losses = [
        lambda output, h_n, c_n, grad=grad: GradientAs.apply(output, grad).sum()
        for grad in expanded
    ]

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ragged = [10, 7, 7, 3, 1] if batch == 5 else [10] * 2 + [8] * 10 + [3] * 12
        for lengths in (None, torch.tensor(ragged)):
            assert_matches(mode, x, weights, h0, False, lengths)
            for loss in (permuted_loss, *expanded_losses):
                assert_matches(mode, x, weights, h0, False, lengths, loss)
    finally:
        torch.set_num_threads(previous)


class GradientAs(torch.autograd.Function):
    """The identity, whose backward hands on the given gradient as it is (strides and all)."""

    @staticmethod
    def forward(ctx, tensor, grad):
        ctx.grad = grad.to(tensor.dtype)  # (the float64 oracle's copy gets a cast one)
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, _):
        return ctx.grad, None


@pytest.mark.parametrize("mode", MODES)
def test_unsorted_lengths_reorder_in_the_op(mode, device):
    """Lengths in any order go to the op as they are: it runs its kernels on the batch sorted
    longest first (ties in their order) and hands back output, states and gradients in the
    caller's order. Both directions, initial states with gradients, and output gradients
    dense, with permuted strides, one value along the batch (stride 0, left as it is) and one
    per step and row."""
    torch.manual_seed(12)
    T, B, I, H = 7, 6, 5, 4
    x = torch.randn(T, B, I, dtype=torch.float64, device=device, requires_grad=True)
    weights = [w.to(device) for w in layer_weights(mode, I, H, directions=2)]
    h0 = torch.randn(2, B, H, dtype=torch.float64, device=device, requires_grad=True)
    c0 = torch.randn_like(h0).requires_grad_() if mode == "LSTM" else None
    lengths = torch.tensor([3, 7, 0, 5, 3, 6])
    grads = [
        torch.randn(2 * H, B, T, dtype=torch.float64).permute(2, 1, 0),
        torch.randn(T, 1, 1, dtype=torch.float64).expand(T, B, 2 * H),
        torch.randn(T, B, 1, dtype=torch.float64).expand(T, B, 2 * H),
    ]
    losses = [weighted_loss] + [
        lambda output, h_n, c_n, grad=grad: (
            GradientAs.apply(output, grad.to(device)).sum() + h_n.sum()
        )
        for grad in grads
    ]
    inputs = [t for t in (x, h0, c0, *weights) if t is not None]
    with torch.no_grad():
        output = torch.ops.rnnext.layer_forward(
            mode, x, weights, h0, c0, True, True, lengths, False
        )[:3]
        expected = reference.recurrent_layer(
            mode, x, weights, h0, c0, bidirectional=True, lengths=lengths
        )
    for a, b in zip(output, expected):
        torch.testing.assert_close(a, b)
    for lens in (lengths, lengths.to(device)):
        for loss in losses:
            (ours, our_grads), (ref, ref_grads) = run_both(
                mode, x, weights, h0, c0, True, True, lens, loss
            )
            assert len(our_grads) == len(inputs)
            for a, b in zip(ours + our_grads, ref + ref_grads):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_expanded_output_gradient(mode, device):
    """The gradient of output.sum() arrives expanded (stride 0); it is read in place."""
    x = torch.randn(7, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    weights = layer_weights(mode, 4, 5, device=device)
    ours = torch.autograd.grad(functional.recurrent_layer(mode, x, weights)[0].sum(), x)
    ref = torch.autograd.grad(reference.recurrent_layer(mode, x, weights)[0].sum(), x)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_input_and_state(mode, device):
    torch.manual_seed(1)
    T, B, I, H = 6, 3, 5, 4
    opts = dict(dtype=torch.float64, device=device)
    # batch-major storage seen time-major, and every other feature: both non-contiguous
    x = torch.randn(B, T, 2 * I, **opts).transpose(0, 1)[:, :, ::2].requires_grad_()
    h0 = torch.randn(1, B, 2 * H, **opts)[:, :, ::2].requires_grad_()
    assert not x.is_contiguous() and not h0.is_contiguous()
    weights = layer_weights(mode, I, H, **opts)
    (ours, our_grads), (ref, ref_grads) = run_both(mode, x, weights, h0, None, True, False)
    for a, b in zip(ours + our_grads, ref + ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_only_where_needed(mode, device):
    """Frozen weights and a constant input get no gradient; the state still does."""
    opts = dict(dtype=torch.float64, device=device)
    x = torch.randn(4, 2, 3, **opts)
    weights = [w.detach() for w in layer_weights(mode, 3, 5, **opts)]
    h0 = torch.randn(1, 2, 5, **opts, requires_grad=True)
    weighted_loss(*functional.recurrent_layer(mode, x, weights, h0)).backward()
    assert all(w.grad is None for w in weights) and x.grad is None
    ref_h0 = h0.detach().requires_grad_()
    weighted_loss(*reference.recurrent_layer(mode, x, weights, ref_h0)).backward()
    torch.testing.assert_close(h0.grad, ref_h0.grad)


@pytest.mark.parametrize("mode", MODES)
def test_no_grad_forward_matches(mode, device):
    opts = dict(dtype=torch.float64, device=device)
    x = torch.randn(5, 3, 4, **opts)
    weights = layer_weights(mode, 4, 6, **opts)
    with torch.no_grad():
        ours = functional.recurrent_layer(mode, x, weights)
        ref = reference.recurrent_layer(mode, x, weights)
    assert not ours[0].requires_grad
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_float32_matches_reference(mode, device):
    torch.manual_seed(2)
    x = torch.randn(20, 4, 16, device=device, requires_grad=True)
    weights = layer_weights(mode, 16, 32, dtype=torch.float32, device=device)
    assert_float32_matches(mode, x, weights, None, False, None)


@pytest.mark.parametrize("mode, proj", [(m, 0) for m in MODES] + [("LSTM", 11)], ids=str)
@pytest.mark.parametrize("batch", [1, 7, 13, 16, 17, 64, 65, 1100], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("H", [37, 64], ids=lambda h: f"H{h}")
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("split", ["units", "rows"])
@pytest.mark.parametrize("with_lengths", [True, False], ids=["lengths", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_packed_kernel(
    mode, proj, batch, H, bidirectional, split, with_lengths, dtype, device, monkeypatch
):
    """GEMMs with a weight operand run on the packed kernel (tiles of 32 float or 16 double
    columns, blocks of 8 rows, chunks of at most 1024 rows): odd sizes with partial tiles and
    blocks, more rows than a chunk, both directions, lengths. A unidirectional layer's steps
    are shared among the threads either by tiles of hidden units (GEMM columns and pointwise
    pass together, H a multiple of the tile) or by batch rows (every other row, each thread
    through all steps of its rows); a bidirectional layer on 2 threads runs each direction on
    one thread."""
    monkeypatch.setenv("RNNEXT_CPU_TEAM_SPLIT", split)
    torch.manual_seed(6)
    T, I = (6 if batch > 2 else 17), 20  # at least 17 rows (T * B): the weights are packed
    x = torch.randn(T, batch, I, dtype=dtype, device=device, requires_grad=True)
    D = 2 if bidirectional else 1
    weights = layer_weights(mode, I, H, directions=D, proj=proj, dtype=dtype, device=device)
    lengths = torch.randint(0, T + 1, (batch,)) if with_lengths else None
    assert_matches(mode, x, weights, None, bidirectional, lengths)


@pytest.mark.parametrize("mode, proj", [(m, 0) for m in MODES] + [("LSTM", 2)], ids=str)
@pytest.mark.parametrize("I", [1, 8, 16, 17], ids=lambda i: f"I{i}")
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("with_lengths", [True, False], ids=["lengths", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_narrow_operands(mode, proj, I, bidirectional, with_lengths, dtype, device):
    """GEMMs whose result is narrow (N at most half a packed tile: 16 floats, 8 doubles) run on
    dot products and outer products instead of padded tiles: few inputs (the input gradient
    and dW_ih), a small projection (h' = m W_hr^T forward, dh = dgh W_hh backward), a one-gate
    cell's input projection at H = 6; on both sides of each width limit."""
    torch.manual_seed(9)
    T, B, H = 6, 9, 6
    x = torch.randn(T, B, I, dtype=dtype, device=device, requires_grad=True)
    D = 2 if bidirectional else 1
    weights = layer_weights(mode, I, H, directions=D, proj=proj, dtype=dtype, device=device)
    lengths = torch.tensor([6, 2, 0, 5, 6, 1, 3, 4, 6]) if with_lengths else None
    assert_matches(mode, x, weights, None, bidirectional, lengths)


@pytest.mark.parametrize("mode, proj", [(m, 0) for m in MODES] + [("LSTM", 40)], ids=str)
@pytest.mark.parametrize("T, B", [(1, 1), (2, 5), (3, 16), (4, 4)], ids=lambda v: str(v))
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("H", [200, 37])
def test_short_sequences_split_columns(mode, proj, T, B, bidirectional, dtype, H):
    """CPU: a call of fewer than 4 steps or 17 rows (T * B) leaves its weights unpacked, and a
    product of at most 16 rows then has its column tiles (32 floats, 16 doubles) shared among
    the threads, each share a BLAS call in backward and dot products (4 rows by 4 columns at
    a time) in forward (sizes that make several tiles per thread, with a partial last tile;
    H = 37 leaves columns and rows outside the blocks of 4)."""
    torch.manual_seed(12)
    I = 300
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
    D = 2 if bidirectional else 1
    weights = layer_weights(mode, I, H, directions=D, proj=proj, dtype=dtype)
    h0 = torch.randn(D, B, proj or H, dtype=dtype, requires_grad=True)
    assert_matches(mode, x, weights, h0, bidirectional, None)


@pytest.mark.parametrize("mode", MODES)
def test_zero_batch(mode, device):
    x = torch.randn(3, 0, 4, dtype=torch.float64, device=device, requires_grad=True)
    weights = layer_weights(mode, 4, 5, device=device)
    out, h_n, c_n = functional.recurrent_layer(mode, x, weights)
    assert out.shape == (3, 0, 5) and h_n.shape == (1, 0, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert all(w.grad is not None and w.grad.abs().sum() == 0 for w in weights)


@pytest.mark.parametrize("mode, proj", [(m, 0) for m in MODES] + [("LSTM", 2)], ids=str)
def test_transposed_weights(mode, proj):
    """Weights that are views with other strides get correct, contiguous gradients."""
    torch.manual_seed(5)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    weights = [
        w.detach().t().contiguous().t().requires_grad_() if w.dim() == 2 else w
        for w in layer_weights(mode, 4, 6, proj=proj)
    ]
    assert not weights[0].is_contiguous()
    (ours, our_grads), (ref, ref_grads) = run_both(mode, x, weights, None, None, True, False)
    for a, b in zip(ours + our_grads, ref + ref_grads):
        torch.testing.assert_close(a, b)
