"""Holding up under repetition, threads, non-finite values and extreme sizes."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from conftest import MODES, make_module, module_pair
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnext import functional


def _resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_no_leak_over_10000_calls(mode):
    """10,000 forward+backward calls at a small size keep resident memory flat: it grows by
    less than 8 MiB after a warm-up of 1,000 calls (a leak of 1 KiB per call would add 10 MiB)."""
    torch.manual_seed(0)
    layer = make_module(mode, 4, 8, nn=False)
    x = torch.randn(5, 2, 4, requires_grad=True)

    def call():
        output = layer(x)[0]
        output.sum().backward()

    for _ in range(1000):
        call()
    before = _resident_bytes()
    for _ in range(10_000):
        call()
    grown = _resident_bytes() - before
    assert grown < 8 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB"


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
@pytest.mark.parametrize("hidden", [10, 64], ids=lambda h: f"H{h}")
def test_threads_share_one_module(mode, hidden):
    """4 Python threads calling the same module at once all get the results of calls made
    one at a time. With H = 64 each CPU call runs its time loops as a team of threads meeting
    at a barrier per step, so several teams spin at once on fewer cores: none may hang."""
    torch.manual_seed(0)
    layer = make_module(mode, 6, hidden, nn=False, num_layers=2)
    inputs = [torch.randn(12, 3, 6) for _ in range(4)]
    expected = [layer(x)[0].detach() for x in inputs]
    got: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(k):
        try:
            results = []
            for _ in range(25):
                x = inputs[k].clone().requires_grad_()
                output = layer(x)[0]
                (grad,) = torch.autograd.grad(output.sum(), x)
                results.append((output.detach(), grad))
            got[k] = results
        except BaseException as err:  # re-raised in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads)
    for k in range(4):
        x = inputs[k].clone().requires_grad_()
        (expected_grad,) = torch.autograd.grad(layer(x)[0].sum(), x)
        for output, grad in got[k]:
            torch.testing.assert_close(output, expected[k])
            torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("mode", MODES)
def test_repeated_calls_are_bitwise_identical(mode, device):
    """The same inputs give bitwise-identical outputs and gradients call after call (on CUDA
    test_cuda.py checks this under torch.use_deterministic_algorithms(True))."""
    torch.manual_seed(1)
    _, ours = module_pair(mode, 24, 40, dtype=torch.float32, device=device, bidirectional=True)
    x = torch.randn(30, 16, 24, device=device)
    lengths = torch.randint(1, 31, (16,))

    def run():
        leaf = x.clone().requires_grad_()
        output = ours(leaf, lengths=lengths)[0]
        grads = torch.autograd.grad((output * output).sum(), [leaf, *ours.parameters()])
        return [output.detach(), *grads]

    first = run()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, run()))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_input_propagates_like_torch_nn(mode, value):
    """A NaN or infinity in one input element gives the same outputs, states and gradients
    as torch.nn (non-finite where it has them, equal elsewhere)."""
    torch.manual_seed(0)
    theirs, ours = module_pair(mode, 3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    x[2, 1, 0] = value
    results = []
    for module in (theirs, ours):
        leaf = x.clone().requires_grad_()
        output, state = module(leaf)
        states = state if isinstance(state, tuple) else (state,)
        (grad,) = torch.autograd.grad(output.sum() + sum(s.sum() for s in states), leaf)
        results.append([output, *states, grad])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_padding_past_lengths_is_never_read(mode, dtype, device):
    """Input past each sequence's end never enters a result: with NaN there, outputs, states
    and every gradient equal torch.nn's on a PackedSequence, which never sees the padding.
    float32 on the CPU takes the packed GEMM kernel, float64 BLAS; the sizes span several
    blocks of steps with rows ending inside them."""
    torch.manual_seed(0)
    T, B = 40, 6
    theirs, ours = module_pair(mode, 5, 7, dtype, device, num_layers=2, bidirectional=True)
    lengths = torch.tensor([40, 33, 33, 17, 2, 0])
    x = torch.randn(T, B, 5, dtype=dtype, device=device)
    x[torch.arange(T)[:, None] >= lengths[None, :]] = float("nan")
    results = []
    for module in (theirs, ours):
        leaf = x.clone().requires_grad_()
        if module is theirs:  # torch.nn refuses length 0: run it on the other rows
            packed = pack_padded_sequence(leaf[:, :-1], lengths[:-1], enforce_sorted=False)
            output, state = module(packed)
            output = pad_packed_sequence(output, total_length=T)[0]
        else:
            output, state = module(leaf, lengths=lengths)
            output = output[:, :-1]
            state = tuple(s[:, :-1] for s in state) if isinstance(state, tuple) else state[:, :-1]
        states = state if isinstance(state, tuple) else (state,)
        loss = output.sum() + sum(s.sum() for s in states)
        grads = torch.autograd.grad(loss, [leaf, *module.parameters()])
        results.append([output, *states, grads[0][:, :-1], *grads[1:]])
    for want, got in zip(*results):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


def test_sizes_beyond_32_bit_gemm_dimensions_are_refused():
    """A batch of 2^31 rows (an expanded input, nothing allocated) is refused with a clear
    error before any work, instead of overflowing BLAS's 32-bit dimensions."""
    x = torch.zeros(1, 1, 1).expand(1, 2**31, 1)
    weights = [torch.zeros(4, 1), torch.zeros(4, 4)]
    with pytest.raises(ValueError, match="32-bit"):
        functional.recurrent_layer("LSTM", x, weights, has_biases=False)
