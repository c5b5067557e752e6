"""The recurrent product of one step, h [M, H] times W^T (W [G*H, H]), through cuBLAS and
through cuBLASLt, for batches of few rows: the measurement behind csrc/cuda/lt_gemm.h.

For float32 (TF32 off) and bfloat16, H in 128..1024, G in 1, 3, 4 (RNN, GRU, LSTM) and M in
1..64 rows it prints the GPU time per product (microseconds; 200 products replayed from a CUDA
graph, so the host's launch time is left out) of ``torch.mm`` with torch's cuBLAS backend, of
one product per gate (G products of [M, H] x [H, H]), and of ``torch.mm`` with torch's
cuBLASLt backend, and marks the shapes where cuBLAS takes more than 1.5 times the fastest.
torch's cuBLASLt path tells its heuristic each operand's alignment up to 256 bytes and gives
it torch's workspace, where rnnext's (lt_gemm.cpp) says at most 16 bytes and gives it 4 MiB,
so the two may pick different kernels; benchmarks/cuda_long_steps.py shows rnnext's own.
Run by gpu_check.sh.
"""

from __future__ import annotations

import time

import torch

REPEATS = 200
CAPTURED = 20  # products per captured graph


def gpu_us(product) -> float:
    """Microseconds per call of product(), replayed from a CUDA graph."""
    for _ in range(5):
        product()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture asks
        for _ in range(3):
            product()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CAPTURED):
            product()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(REPEATS // CAPTURED):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / REPEATS * 1e6


def measure(dtype: torch.dtype, hidden: int, gates: int, rows: int) -> dict[str, float]:
    h = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    w = torch.randn(gates * hidden, hidden, device="cuda", dtype=dtype)
    out = torch.empty(rows, gates * hidden, device="cuda", dtype=dtype)
    w_gates = list(w.split(hidden))
    out_gates = [torch.empty(rows, hidden, device="cuda", dtype=dtype) for _ in w_gates]

    def whole():
        torch.mm(h, w.t(), out=out)

    def per_gate():
        for w_gate, out_gate in zip(w_gates, out_gates):
            torch.mm(h, w_gate.t(), out=out_gate)

    times = {}
    try:
        torch.backends.cuda.preferred_blas_library("cublas")
        times["cublas"] = gpu_us(whole)
        times["per gate"] = gpu_us(per_gate)
        torch.backends.cuda.preferred_blas_library("cublaslt")
        times["cublaslt"] = gpu_us(whole)
    finally:
        torch.backends.cuda.preferred_blas_library("cublas")
    return times


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; us per product [M, H] x "
        "[H, G*H]"
    )
    for dtype in (torch.float32, torch.bfloat16):
        for hidden in (128, 256, 512, 1024):
            for gates in (1, 3, 4):
                for rows in (1, 4, 8, 16, 32, 64):
                    times = measure(dtype, hidden, gates, rows)
                    fastest = min(times, key=times.get)
                    slow = times["cublas"] > 1.5 * times[fastest]
                    cells = "  ".join(f"{name} {us:6.2f}" for name, us in times.items())
                    print(
                        f"{str(dtype)[6:]:8s} H={hidden:4d} G={gates} M={rows:3d}  {cells}  "
                        f"fastest {fastest}{'  <== cuBLAS slow' if slow else ''}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
