"""A small forward+backward of every cell on CUDA, for compute-sanitizer (gpu_check.sh).

Covers one and two directions, per-sequence lengths (with a zero length), the LSTM
projection and blocked input-side GEMMs, in float32 and bfloat16; runs each case three times
and prints the replay counters; checks the float32 results against rnnext.reference and exits
non-zero on a mismatch. Under compute-sanitizer no call repeats an earlier one's buffers (with
or without the caching allocator, every call got new addresses on an H200), so memcheck covers
the eager launches; the bitwise tests of replayed against eager calls cover the replay.
"""

from __future__ import annotations

import os

import torch

import rnnext
from rnnext import reference

MODES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}


def run_case(mode: str, dtype: torch.dtype, bidirectional: bool, proj: int) -> None:
    T, B, I, H = 7, 4, 5, 6
    P, D, G = proj or H, 2 if bidirectional else 1, MODES[mode]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) / 2).to("cuda", dtype).requires_grad_()

    weights = []
    for _ in range(D):
        weights += [rand(G * H, I), rand(G * H, P), rand(G * H), rand(G * H)]
        weights += [rand(P, H)] if proj else []
    x, hx = rand(T, B, I), rand(D, B, P)
    cx = rand(D, B, H) if mode == "LSTM" else None
    lengths = torch.tensor([7, 0, 5, 2])
    results = []
    for impl in (rnnext.functional, reference) if dtype == torch.float32 else (rnnext.functional,):
        out = impl.recurrent_layer(
            mode, x, weights, hx, cx, bidirectional=bidirectional, lengths=lengths
        )
        leaves = [x, hx] + ([cx] if cx is not None else []) + weights
        loss = sum((t.float() * (k + 1)).sum() for k, t in enumerate(out))
        results.append([*out, *torch.autograd.grad(loss, leaves)])
    if len(results) == 2:
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.cuda.synchronize()


def main() -> None:
    os.environ.setdefault("RNNEXT_CUDA_BLOCK_STEPS", "3")
    for dtype in (torch.float32, torch.bfloat16):
        for mode in MODES:
            for bidirectional in (False, True):
                for proj in (0, 3) if mode == "LSTM" else (0,):
                    # three times: without a sanitizer, calls from the second on replay
                    for _ in range(3):
                        run_case(mode, dtype, bidirectional, proj)
                    print(f"ok {mode} {dtype} bidirectional={bidirectional} proj={proj}")
    print("graph replay:", rnnext.functional.cuda_graph_stats())


if __name__ == "__main__":
    main()
