"""Training-loop timing on CUDA: where the CUDA graph replay of repeated calls pays off.

The main benchmark calls a layer again and again on the same buffers. A training loop
allocates a new input each iteration and runs an optimizer between calls, so a call repeats
an earlier one's buffers only when the caching allocator hands out the same blocks. This
times whole iterations (input copied from the host, forward, backward, Adam step) of a
2-layer bidirectional layer for torch.nn (cuDNN) and rnnext with and without replay
(RNNEXT_CUDA_GRAPHS, read at every call), in the same process, and prints rnnext's replay
counters summed over its replayed runs (warm-up iterations included). TF32 is off on both
sides, as in the main benchmark.

    python benchmarks/cuda_train_loop.py [--iters 20]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import rnnext

T, B, H = 100, 64, 512


def ms_per_iteration(module: torch.nn.Module, dtype: torch.dtype, iters: int) -> float:
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    batches = [torch.randn(T, B, H, dtype=dtype).pin_memory() for _ in range(4)]

    def step(i: int) -> None:
        out, _ = module(batches[i % len(batches)].cuda(non_blocking=True))
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(5):
        step(i)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(iters):
        step(i)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per run")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    print(f"ms per iteration, 2-layer bidirectional, T x B x I=H = {T} x {B} x {H}, best of 2")
    for name in ("LSTM", "GRU"):
        for dtype in (torch.bfloat16, torch.float32):
            torch.manual_seed(0)
            reference = getattr(torch.nn, name)(H, H, num_layers=2, bidirectional=True)
            reference = reference.to("cuda", dtype)
            ours = getattr(rnnext, name)(H, H, num_layers=2, bidirectional=True).to("cuda", dtype)
            # (label, module, RNNEXT_CUDA_GRAPHS): runs alternate, best of two each
            runs = [("torch.nn", reference, "1"), ("replay", ours, "1"), ("eager", ours, "0")]
            best = {label: float("inf") for label, _, _ in runs}
            counts = dict.fromkeys(rnnext.functional.cuda_graph_stats(), 0)
            for _ in range(2):
                for label, module, flag in runs:
                    os.environ["RNNEXT_CUDA_GRAPHS"] = flag
                    before = rnnext.functional.cuda_graph_stats()
                    ms = ms_per_iteration(module, dtype, args.iters)
                    best[label] = min(best[label], ms)
                    after = rnnext.functional.cuda_graph_stats()
                    if label == "replay":
                        counts = {k: counts[k] + after[k] - before[k] for k in after}
            os.environ.pop("RNNEXT_CUDA_GRAPHS")
            print(
                f"  {name:4s} {str(dtype)[6:]:8s} torch.nn {best['torch.nn']:6.2f}"
                f"  rnnext replay {best['replay']:6.2f}  eager {best['eager']:6.2f}"
                f"  ratio {best['torch.nn'] / best['replay']:.2f}"
                f" (eager {best['torch.nn'] / best['eager']:.2f})  counters {counts}"
            )


if __name__ == "__main__":
    main()
