"""Where the GPU time of one forward+backward goes, rnnext against torch.nn (cuDNN).

For LSTM and GRU at (T=100, B=64, I=H=512) in float32 and bfloat16: wall time per call, the
summed time of the GPU kernels it ran and their count (wall time well above kernel time means
the GPU waits on the host between launches), and the kernels that took most time. rnnext is
shown twice: its repeated calls replayed as a CUDA graph (the default), and launched eagerly
(``RNNEXT_CUDA_GRAPHS=0``). Run by gpu_check.sh; prints a plain-text report. float32 runs
without TF32 on both sides.
"""

from __future__ import annotations

import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

import rnnext

T, B, H = 100, 64, 512
CALLS = 10


def forward_backward(module, x, hx):
    output, state = module(x, hx)
    loss = output.float().sum() + sum(s.float().sum() for s in state)
    loss.backward()


def gpu_kernels(call):
    """The CUDA kernels that one call() runs, from a profile: their events (one per kernel
    name), their summed GPU time in microseconds and their launch count."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    return kernels, sum(e.self_device_time_total for e in kernels), sum(e.count for e in kernels)


def report(name, module, x, hx):
    for _ in range(3):
        forward_backward(module, x, hx)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        forward_backward(module, x, hx)
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) / CALLS * 1e6
    kernels, busy_us, launches = gpu_kernels(lambda: forward_backward(module, x, hx))
    print(f"  {name:14s} wall {wall_us:8.0f} us   kernels {busy_us:8.0f} us in {launches} launches")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:4]:
        share = e.self_device_time_total / max(busy_us, 1e-9)
        print(f"      {share:5.1%} {e.count:5d}x  {e.key[:90]}")


def main() -> None:
    # full float32 on both sides, as the benchmark's default (cuDNN would otherwise use TF32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for dtype in (torch.float32, torch.bfloat16):
        for cell in ("LSTM", "GRU"):
            torch.manual_seed(0)
            theirs = getattr(torch.nn, cell)(H, H).to("cuda", dtype)
            ours = getattr(rnnext, cell)(H, H).to("cuda", dtype)
            ours.load_state_dict(theirs.state_dict())
            x = torch.randn(T, B, H, device="cuda", dtype=dtype, requires_grad=True)
            h0 = torch.zeros(1, B, H, device="cuda", dtype=dtype)
            hx = (h0, h0) if cell == "LSTM" else h0
            print(f"{cell} {T}x{B}x{H} {dtype} forward+backward")
            report("torch.nn", theirs, x, hx)
            report("rnnext", ours, x, hx)  # repeated calls: replayed as a CUDA graph
            saved = os.environ.get("RNNEXT_CUDA_GRAPHS")
            os.environ["RNNEXT_CUDA_GRAPHS"] = "0"
            try:
                report("rnnext, eager", ours, x, hx)
            finally:
                if saved is None:
                    del os.environ["RNNEXT_CUDA_GRAPHS"]
                else:
                    os.environ["RNNEXT_CUDA_GRAPHS"] = saved


if __name__ == "__main__":
    main()
