"""Variable-length and very long sequences: rnnext against torch.nn.

Two measurements, each in its own section of the output and of the JSON file:

* lengths: forward+backward on a padded batch with per-sequence lengths (T=200, B=32,
  I=H=256, lengths uniform in [50, 200] by default). torch.nn runs a PackedSequence (and, for
  scale, the padded batch without lengths); rnnext runs ``lengths=`` and the same
  PackedSequence. Same weights and inputs, interleaved, best of --rounds (3) rounds of
  --repeats (5) repeats, GRU and LSTM taking turns.
* memory: peak memory and time of one forward+backward of ``output.sum()`` at (T=100000,
  B=8, I=H=256): rnnext by default and with ``checkpoint_every``, and torch.nn with
  --with-torch-memory (on the CPU it needs about 14 GB and takes minutes), and a
  bidirectional LSTM too with --bidirectional. On the CPU the peak resident memory
  (ru_maxrss) of a fresh process per configuration; with ``--device cuda`` the peak of GPU
  memory allocated by torch (in-process).

    python benchmarks/sequences.py [--device cuda] [--quick] [--with-torch-memory]
        [--bidirectional] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnext
from rnnext.bench import paused_gc, result_difference, weighted_loss


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_of(fns: dict, repeats: int, device: str = "cpu") -> dict:
    """Interleaved timing of each callable; the best time of each, in ms."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: float("inf") for name in fns}
    with paused_gc():
        for _ in range(repeats):
            for name, fn in fns.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name] = min(times[name], time.perf_counter() - start)
    return {name: t * 1e3 for name, t in times.items()}


def check_agreement(theirs, ours, x, lengths) -> None:
    """Raises unless rnnext, with ``lengths=`` and with a PackedSequence, gives torch.nn's
    PackedSequence results: the padded output, the final states, and the gradients of x and of
    every weight for a position-weighted loss. No time of a wrong result is reported."""

    def results(module, packed: bool) -> list:
        leaf = x.detach().requires_grad_()
        if packed:
            output, hidden = module(pack_padded_sequence(leaf, lengths, enforce_sorted=False))
            output, _ = pad_packed_sequence(output, total_length=x.shape[0])
        else:
            output, hidden = module(leaf, lengths=lengths)
        loss = weighted_loss((output, hidden))
        grads = torch.autograd.grad(loss, [leaf, *module.parameters()])
        states = hidden if isinstance(hidden, tuple) else (hidden,)
        return [output.detach(), *(h.detach() for h in states), *grads]

    expected = results(theirs, packed=True)
    for packed in (False, True):
        for k, (got, want) in enumerate(zip(results(ours, packed), expected)):
            detail = result_difference(got, want)
            if detail is not None:
                path = "PackedSequence" if packed else "lengths="
                raise RuntimeError(f"rnnext ({path}) disagrees with torch.nn, result {k}: {detail}")


def lengths_steps(cell: str, T: int, B: int, H: int, low: int, device: str = "cpu") -> dict:
    """The timed callables of the lengths measurement, on the same weights and inputs."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, cell)(H, H).to(device)
    ours = getattr(rnnext, cell)(H, H).to(device)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(T, B, H, device=device, requires_grad=True)
    lengths = torch.randint(low, T + 1, (B,), generator=torch.Generator().manual_seed(1))

    def run(module, inp, **kwargs):
        def step():
            output, _ = module(inp, **kwargs)
            data = output.data if hasattr(output, "batch_sizes") else output
            data.sum().backward()
            x.grad = None
            for p in module.parameters():
                p.grad = None

        return step

    check_agreement(theirs, ours, x, lengths)
    # packing is part of the packed path's cost, so it is rebuilt inside the timed step
    return {
        "torch_packed": lambda: run(
            theirs, pack_padded_sequence(x, lengths, enforce_sorted=False)
        )(),
        "torch_padded": run(theirs, x),
        "rnnext_lengths": run(ours, x, lengths=lengths),
        "rnnext_packed": lambda: run(
            ours, pack_padded_sequence(x, lengths, enforce_sorted=False)
        )(),
    }


def lengths_cases(
    cells: tuple[str, ...], T: int, B: int, H: int, low: int, repeats: int, rounds: int, device: str
) -> list[dict]:
    """Best times of each cell's callables over ``rounds`` rounds of ``repeats`` repeats, the
    cells taking turns, so that a slow spell of the machine lasting seconds cannot decide a
    figure."""
    steps = {cell: lengths_steps(cell, T, B, H, low, device) for cell in cells}
    best = {cell: {name: float("inf") for name in steps[cell]} for cell in cells}
    for _ in range(rounds):
        for cell in cells:
            for name, ms in best_of(steps[cell], repeats, device).items():
                best[cell][name] = min(best[cell][name], ms)
    return [
        {
            "cell": cell,
            "device": device,
            "T": T,
            "B": B,
            "H": H,
            "lengths": f"uniform in [{low}, {T}]",
            **{f"{k}_ms": round(v, 2) for k, v in best[cell].items()},
            "ratio_packed_over_lengths": round(
                best[cell]["torch_packed"] / best[cell]["rnnext_lengths"], 2
            ),
        }
        for cell in cells
    ]


def memory_module(cell: str, impl: str, H: int, every: int | None, bidirectional: bool):
    lib = torch.nn if impl == "torch.nn" else rnnext
    kwargs = {} if impl == "torch.nn" else {"checkpoint_every": every}
    return getattr(lib, cell)(H, H, bidirectional=bidirectional, **kwargs)


def memory_row(cell, impl, T, B, H, every, bidirectional) -> dict:
    mode = "default" if impl == "torch.nn" or not every else f"checkpoint_every={every}"
    return dict(cell=cell, impl=impl, mode=mode, T=T, B=B, H=H, bidirectional=bidirectional)


def memory_child(cell: str, impl: str, T: int, B: int, H: int, every, bidirectional) -> None:
    """Runs in a fresh process: one forward+backward, then prints peak RSS and time as JSON."""
    torch.manual_seed(0)
    module = memory_module(cell, impl, H, every, bidirectional)
    x = torch.randn(T, B, H, requires_grad=True)
    start = time.perf_counter()
    output, _ = module(x)
    output.sum().backward()
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_gb": peak_kib * 1024 / 1e9, "seconds": seconds}))


def cuda_memory_case(cell, impl, T, B, H, every, bidirectional) -> dict:
    """Peak GPU memory allocated by torch during one forward+backward, and its time."""
    torch.manual_seed(0)
    module = memory_module(cell, impl, H, every, bidirectional).cuda()
    x = torch.randn(T, B, H, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    row = {**memory_row(cell, impl, T, B, H, every, bidirectional), "device": "cuda"}
    start = time.perf_counter()
    try:
        output, _ = module(x)
        output.sum().backward()
        torch.cuda.synchronize()
    except RuntimeError as err:  # cuDNN refuses some lengths: recorded, not fatal (rnnext's raise)
        if impl != "torch.nn":
            raise
        return {**row, "error": str(err).splitlines()[0], "peak_gb": None, "seconds": None}
    seconds = time.perf_counter() - start
    return {**row, "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "seconds": seconds}


def memory_case(cell, impl, T, B, H, every, bidirectional) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", cell, impl, str(T), str(B), str(H)]
    cmd += [str(every or 0), str(int(bidirectional))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**memory_row(cell, impl, T, B, H, every, bidirectional), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, 1 round of 2 repeats, for a smoke test"
    )
    parser.add_argument("--repeats", type=int, default=5, help="repeats per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--memory-steps",
        type=int,
        default=100_000,
        help="T of the memory measurement (0 skips it)",
    )
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--with-torch-memory", action="store_true")
    parser.add_argument(
        "--bidirectional",
        action="store_true",
        help="also measure the memory of a bidirectional LSTM",
    )
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--memory-child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        cell, impl, T, B, H, every, bidirectional = args.memory_child
        memory_child(cell, impl, int(T), int(B), int(H), int(every) or None, bidirectional == "1")
        return

    T, B, H, low = (40, 8, 32, 10) if args.quick else (200, 32, 256, 50)
    mem_T = min(2000, args.memory_steps) if args.quick else args.memory_steps
    for option in ("repeats", "rounds", "checkpoint_every"):
        if getattr(args, option) < 1:
            flag = option.replace("_", "-")
            parser.error(f"--{flag} must be at least 1, got {getattr(args, option)}")
    if args.memory_steps < 0:
        parser.error(f"--memory-steps must be at least 0, got {args.memory_steps}")
    repeats, rounds = (2, 1) if args.quick else (args.repeats, args.rounds)
    # full float32 on both sides, as in the main benchmark (cuDNN would otherwise use TF32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        },
        "lengths": [],
        "memory": [],
    }
    print(
        f"forward+backward with per-sequence lengths (best of {rounds} rounds of {repeats} "
        "repeats, ms)"
    )
    for row in lengths_cases(("GRU", "LSTM"), T, B, H, low, repeats, rounds, args.device):
        report["lengths"].append(row)
        print(
            f"  {row['cell']:4}  torch.nn packed {row['torch_packed_ms']:8.1f}  "
            f"padded {row['torch_padded_ms']:8.1f} | rnnext lengths "
            f"{row['rnnext_lengths_ms']:8.1f}  packed {row['rnnext_packed_ms']:8.1f}  "
            f"ratio packed/lengths {row['ratio_packed_over_lengths']:.2f}"
        )
    where = "GPU memory allocated" if args.device == "cuda" else "resident memory"
    layers = [("LSTM", False), ("GRU", False)] + ([("LSTM", True)] if args.bidirectional else [])
    layers = layers if mem_T > 0 else []  # --memory-steps 0 skips the measurement
    if layers:
        print(f"peak {where} and time of forward+backward at T={mem_T}, B=8, I=H=256")
    for cell, bidirectional in layers:
        impls = [("rnnext", None), ("rnnext", args.checkpoint_every)]
        if args.with_torch_memory:
            impls.insert(0, ("torch.nn", None))
        name = f"{cell} bi" if bidirectional else cell
        for impl, every in impls:
            measure = cuda_memory_case if args.device == "cuda" else memory_case
            row = measure(cell, impl, mem_T, 8, 256, every, bidirectional)
            report["memory"].append(row)
            if row.get("error"):
                print(f"  {name:7}  {impl:8} {row['mode']:22} failed: {row['error']}")
                continue
            print(
                f"  {name:7}  {impl:8} {row['mode']:22} peak {row['peak_gb']:6.2f} GB  "
                f"time {row['seconds']:7.2f} s"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sequences.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'sequences.json'}")


if __name__ == "__main__":
    main()
