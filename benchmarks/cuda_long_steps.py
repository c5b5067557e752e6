"""Per-step cost of a long sequence with a small batch on the GPU, rnnext against torch.nn.

At (T=4000, B=8, I=H=256), float32 without TF32, launches eager (``RNNEXT_CUDA_GRAPHS=0``, as
calls too long to replay run): microseconds per step of a forward without gradients, a
forward with them, forward+backward of ``output.sum()``, the same with
``checkpoint_every=1000``, and torch.nn's (cuDNN) forward and forward+backward; then, from a
profile of one rnnext call, the GPU kernel time per step, the launches per step and the
kernels that take most time. Best of 3 calls. Run by gpu_check.sh.
"""

from __future__ import annotations

import os

os.environ["RNNEXT_CUDA_GRAPHS"] = "0"  # (read at each call) every call of this script eager

import time  # noqa: E402

import torch  # noqa: E402
from cuda_profile import gpu_kernels  # noqa: E402  (this folder)

import rnnext  # noqa: E402

T, B, H = 4000, 8, 256


def us_per_step(call, repeats: int = 3) -> float:
    call()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best / T * 1e6


def kernel_report(name: str, call) -> None:
    call()
    torch.cuda.synchronize()
    kernels, busy, launches = gpu_kernels(call)
    print(f"  {name}: kernels {busy / T:.2f} us/step in {launches / T:.2f} launches/step")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:4]:
        print(f"    {e.self_device_time_total / T:6.2f} us/step {e.count:6d}x  {e.key[:90]}")


def forward(module, x, grad: bool):
    def call():
        with torch.set_grad_enabled(grad):
            module(x)

    return call


def forward_backward(module, x):
    def call():
        output, _ = module(x)
        output.sum().backward()

    return call


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; T={T}, B={B}, I=H={H}")
    for cell in ("LSTM", "GRU"):
        torch.manual_seed(0)
        theirs = getattr(torch.nn, cell)(H, H).to("cuda")
        ours = getattr(rnnext, cell)(H, H).to("cuda")
        bounded = getattr(rnnext, cell)(H, H, checkpoint_every=1000).to("cuda")
        ours.load_state_dict(theirs.state_dict())
        bounded.load_state_dict(theirs.state_dict())
        x = torch.randn(T, B, H, device="cuda", requires_grad=True)

        times = {
            "forward, no grad": us_per_step(forward(ours, x, False)),
            "forward": us_per_step(forward(ours, x, True)),
            "forward+backward": us_per_step(forward_backward(ours, x)),
            "checkpoint_every=1000": us_per_step(forward_backward(bounded, x)),
            "torch.nn forward, no grad": us_per_step(forward(theirs, x, False)),
            "torch.nn forward+backward": us_per_step(forward_backward(theirs, x)),
        }
        print(f"{cell}, us per step:")
        for name, us in times.items():
            print(f"  {name:26s} {us:7.2f}")
        kernel_report(f"{cell} rnnext forward, no grad", forward(ours, x, False))
        kernel_report(f"{cell} rnnext forward+backward", forward_backward(ours, x))


if __name__ == "__main__":
    main()
