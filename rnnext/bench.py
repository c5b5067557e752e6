"""Benchmark rnnext's recurrent layers against torch.nn in the same process.

Run ``python -m rnnext.bench`` (``--help`` lists the options). For every configuration
(cell, sequence length T, batch B, input size I, hidden size H, layers, directions) the
benchmark builds a torch.nn module and the matching rnnext module with the same weights
(``load_state_dict``), feeds both the same input and initial state, and measures two passes:

* ``fwd``: forward under ``torch.no_grad()``;
* ``fwd+bwd``: forward with an input that requires grad, then
  ``(output.sum() + h_n.sum() [+ c_n.sum()]).backward()``; input and parameter grads are set
  to None between repeats, outside the timed region.

Before anything is timed, both passes run once on both modules (the backward of a sum of
every result with fixed weights 1 to 7 by position) and the outputs, final states and
gradients are compared: float32 with ``torch.testing.assert_close(rtol=1e-3, atol=1e-4 *
max(1, m))``, m the tensor's largest absolute value, float64 with rtol 1e-9 and atol
1e-10 * max(1, m); float16 and bfloat16 (CUDA
only) by the largest difference relative to m, at most ``HALF_TOLERANCE`` (a wrong gate or a
missing term gives errors of order one there). On CUDA, float32 runs with TF32 off on both
sides (cuDNN and rnnext's cuBLAS GEMMs) unless ``--tf32`` turns it on for both. A
configuration that disagrees is recorded with ``"agree": false`` and is not timed, so no speed
of a wrong result is ever reported; ``main()`` then exits with status 1.

On CUDA every repeat reuses the same input and weights, and torch's caching allocator hands
each call the same blocks, so from its second call on rnnext replays the call's time loops as
a CUDA graph, as it does in a steady training loop; ``RNNEXT_CUDA_GRAPHS=0`` in the
environment times eager launches instead. There the agreement check runs once more after the
timed rounds, on replayed calls, and a disagreement then drops the configuration's times.

Repeat policy: timings are taken with ``time.perf_counter`` (with ``torch.cuda.synchronize()``
around each one on CUDA), alternating torch.nn and rnnext repeat by repeat so that machine
noise hits both alike, with Python's garbage collector paused (as ``timeit`` does), and the
minimum is reported. The configurations are timed in ``ROUNDS`` (3) rounds, one pass through
all of them after the other, and each side's minimum is taken over all rounds: on a shared
machine a slow spell (other work on the host) lasts seconds to minutes, and rounds tens of
seconds apart give every configuration several chances to be timed outside one, on both sides
alike. Each round starts a configuration with one untimed call of each pass per side (in the
first round the agreement check is that call), and ``torch.mm`` with one untimed call per
shape; then repeats continue until one side has spent ``BUDGET_S`` (0.4 s) of timed work, with
at least ``MIN_REPEATS`` (2) and at most ``MAX_REPEATS`` (8) repeats; ``--repeats N`` fixes the
count per round to N instead, ``--rounds R`` the number of rounds, and ``--quick`` uses tiny
sizes, one round and ``QUICK_REPEATS``. A record's ``repeats`` counts the timed repeats of all
its ``rounds``. The default run takes 90-100 s on a 2-core machine (the budget is 3 minutes);
busy cores slow it down.

GEMM efficiency: one layer direction's forward does the FLOPs of a single
``[T*B, I+H] x [I+H, G*H]`` product (G = 1 for RNN, 3 for GRU, 4 for LSTM), i.e.
``2*T*B*(I+H)*G*H``, and forward+backward three times that. For each such shape the benchmark
measures the FLOP/s that ``torch.mm`` reaches on it once per round, with the same repeat
policy, and keeps the best. The efficiency is the time ``torch.mm`` would need for the layer's
FLOPs divided by rnnext's best time; for one layer this is ``(FLOPs / rnnext time) /
torch.mm FLOP/s``, and for several layers (where layer l > 0 has input size
``H * directions``) the ideal times of the layers are summed.

Outputs: a progress bar on stderr (tqdm, or a plain counter without it), a table on stdout,
and in ``--out`` (default ``bench-results/``) ``bench.json`` (one record per configuration
and pass, with machine information) and ``bench.png`` (torch.nn time / rnnext time per
configuration; needs matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, TypeVar, Union

import torch
from torch import nn

import rnnext

Tensor = torch.Tensor
State = Union[Tensor, tuple[Tensor, Tensor]]
Record = dict[str, Any]
Shape = tuple[int, int, int]

CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm")
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}
DEFAULT_CELLS = ("rnn_tanh", "gru", "lstm")
DEFAULT_SIZES: tuple[Shape, ...] = ((1000, 1, 32), (500, 8, 128), (200, 32, 256), (100, 64, 512))
QUICK_SIZES: tuple[Shape, ...] = ((20, 2, 8), (10, 4, 16))
# 2-layer bidirectional GRU and LSTM, added when none of --sizes, --layers, --bidirectional is
# given (at QUICK_EXTRA_SIZE with --quick).
EXTRA_CELLS = ("gru", "lstm")
EXTRA_LAYERS = 2
EXTRA_SIZE: Shape = (200, 32, 256)
QUICK_EXTRA_SIZE: Shape = (10, 2, 8)

ROUNDS = 3
MIN_REPEATS = 2
MAX_REPEATS = 8
BUDGET_S = 0.4
QUICK_REPEATS = 3
RTOL = 1e-3
ATOL = 1e-4
# float64: sums of T*B products in another order differ by about T*B unit roundoffs (1e-12
# relative at the sizes here); these bounds leave a thousandfold margin and no more
RTOL_FLOAT64 = 1e-9
ATOL_FLOAT64 = 1e-10
PASSES = ("fwd", "fwd+bwd")
# FLOPs of forward+backward relative to forward (forward, grad of inputs, grad of weights).
PASS_FLOP_FACTOR = {"fwd": 1, "fwd+bwd": 3}
# Labelled ticks of the plot's logarithmic ratio axis.
RATIO_TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Largest allowed difference relative to a tensor's largest value, per half type: a few
# hundred unit roundoffs (2^-11, 2^-8) for errors that grow along the recurrence.
HALF_TOLERANCE = {torch.float16: 0.02, torch.bfloat16: 0.08}


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmarked layer shape; the input size equals ``hidden_size`` unless given."""

    cell: str
    seq_len: int
    batch: int
    hidden_size: int
    layers: int = 1
    bidirectional: bool = False
    input_size: int = 0

    @property
    def in_size(self) -> int:
        """The first layer's input size I."""
        return self.input_size or self.hidden_size

    @property
    def directions(self) -> int:
        """Number of directions (1 or 2)."""
        return 2 if self.bidirectional else 1

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``lstm 200x32x256 L2 bi``."""
        size = f"{self.seq_len}x{self.batch}x{self.hidden_size}"
        if self.in_size != self.hidden_size:
            size += f" I{self.in_size}"
        layers = f" L{self.layers}" if self.layers > 1 else ""
        return f"{self.cell} {size}{layers}{' bi' if self.bidirectional else ''}"

    def gemm_shapes(self) -> list[Shape]:
        """Per layer, the (M, K, N) of the product ``[T*B, I_l+H] x [I_l+H, G*H]``."""
        rows = self.seq_len * self.batch
        cols = GATES[self.cell] * self.hidden_size
        inputs = [self.in_size] + [self.hidden_size * self.directions] * (self.layers - 1)
        return [(rows, i + self.hidden_size, cols) for i in inputs]

    def forward_flops(self) -> int:
        """FLOPs of the forward pass counted as GEMM work (all layers and directions)."""
        return sum(gemm_flops(shape) for shape in self.gemm_shapes()) * self.directions


@dataclasses.dataclass(frozen=True)
class RepeatPolicy:
    """How many times a measurement is repeated; see the module docstring."""

    min_repeats: int = MIN_REPEATS  # per round
    max_repeats: int = MAX_REPEATS  # per round
    budget_s: float = BUDGET_S  # per round and side
    warmup: int = 1
    rounds: int = ROUNDS


@dataclasses.dataclass(frozen=True)
class Step:
    """One timed callable and an optional untimed reset run before each call."""

    run: Callable[[], object]
    reset: Callable[[], None] | None = None


def gemm_flops(shape: Shape) -> int:
    """FLOPs of an ``[M, K] x [K, N]`` matrix product."""
    m, k, n = shape
    return 2 * m * k * n


def _module_classes(cell: str) -> tuple[type[nn.RNNBase], type[nn.RNNBase], dict[str, str]]:
    """torch.nn class, rnnext class and extra constructor arguments for a cell name."""
    if cell == "gru":
        return nn.GRU, rnnext.GRU, {}
    if cell == "lstm":
        return nn.LSTM, rnnext.LSTM, {}
    return nn.RNN, rnnext.RNN, {"nonlinearity": cell.split("_")[1]}


def build_pair(
    config: Config,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[nn.RNNBase, nn.RNNBase]:
    """Builds ``(torch_module, rnnext_module)`` for ``config`` with identical weights.

    The torch.nn module is initialised from ``seed`` and its ``state_dict`` is loaded into the
    rnnext module.
    """
    torch_cls, rnnext_cls, extra = _module_classes(config.cell)
    kwargs: dict[str, Any] = dict(
        input_size=config.in_size,
        hidden_size=config.hidden_size,
        num_layers=config.layers,
        bidirectional=config.bidirectional,
        **extra,
    )
    torch.manual_seed(seed)
    reference = torch_cls(**kwargs)
    fused = rnnext_cls(**kwargs)
    fused.load_state_dict(reference.state_dict())
    return reference.to(device, dtype), fused.to(device, dtype)


def make_inputs(
    config: Config,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[Tensor, State]:
    """Random input ``[T, B, I]`` and initial state (``(h_0, c_0)`` for LSTM) for ``config``."""
    gen = torch.Generator().manual_seed(seed)
    state_shape = (config.layers * config.directions, config.batch, config.hidden_size)
    x = torch.randn(config.seq_len, config.batch, config.in_size, generator=gen, dtype=dtype)
    h0 = torch.randn(state_shape, generator=gen, dtype=dtype).to(device)
    if config.cell == "lstm":
        c0 = torch.randn(state_shape, generator=gen, dtype=dtype).to(device)
        return x.to(device), (h0, c0)
    return x.to(device), h0


def _results(output: tuple[Tensor, State]) -> list[Tensor]:
    """A module's output followed by its final state(s)."""
    out, state = output
    return [out, *(state if isinstance(state, tuple) else (state,))]


def _loss(output: tuple[Tensor, State]) -> Tensor:
    """``output.sum() + h_n.sum()`` (``+ c_n.sum()`` for LSTM) of a module's result."""
    return torch.stack([t.sum() for t in _results(output)]).sum()


def weighted_loss(output: tuple[Tensor, State]) -> Tensor:
    """A sum of every result with fixed, position-dependent weights (1 to 7): unlike a plain
    sum, its gradient tells every output position apart, so errors cannot hide in symmetry."""

    def weighted(t: Tensor) -> Tensor:
        w = torch.arange(t.numel(), device=t.device) % 7 + 1
        return (t * w.reshape(t.shape).to(t.dtype)).sum()

    return torch.stack([weighted(t) for t in _results(output)]).sum()


def check_agreement(reference: nn.Module, fused: nn.Module, x: Tensor, hx: State) -> str | None:
    """Runs both passes on both modules; None if all results agree, else the first difference.

    Compared: the no-grad forward's output and final states, and after forward+backward of a
    weighted sum of them the output, final states, input grad and every parameter grad. A
    reference module in another dtype than x (a float32 copy for bfloat16 on the CPU) runs on
    x and hx in its dtype, and its results are rounded to x's before the comparison.
    """
    names = ["output", "h_n", "c_n"] if isinstance(hx, tuple) else ["output", "h_n"]
    grad_names = ["input grad"] + [f"{n} grad" for n, _ in reference.named_parameters()]
    ref_dtype = next(reference.parameters()).dtype

    def inputs_for(module: nn.Module) -> tuple[Tensor, State]:
        if module is fused or ref_dtype == x.dtype:
            return x, hx
        state = tuple(t.to(ref_dtype) for t in hx) if isinstance(hx, tuple) else hx.to(ref_dtype)
        return x.to(ref_dtype), state

    with torch.no_grad():
        forward = [
            [t.to(x.dtype) for t in _results(module(*inputs_for(module)))]
            for module in (reference, fused)
        ]
    backward = []
    for module in (reference, fused):
        module_x, module_hx = inputs_for(module)
        leaf = module_x.detach().clone().requires_grad_(True)
        output = module(leaf, module_hx)
        weighted_loss(output).backward()
        grads = [leaf.grad] + [p.grad for p in module.parameters()]
        backward.append([t.detach().to(x.dtype) for t in _results(output) + grads])
        module.zero_grad(set_to_none=True)
    for pass_name, (expected, actual), labels in zip(
        PASSES, (forward, backward), (names, names + grad_names)
    ):
        if len(expected) != len(actual):
            return f"{pass_name}: {len(actual)} results against torch.nn's {len(expected)}"
        for label, want, got in zip(labels, expected, actual):
            detail = result_difference(got, want)
            if detail is not None:
                return f"{pass_name} {label}: {detail}"
    return None


def result_difference(got: Tensor, want: Tensor) -> str | None:
    """None if got agrees with want at the dtype's tolerance, else a description."""
    if want.dtype in HALF_TOLERANCE and got.dtype == want.dtype and got.shape == want.shape:
        scale = want.abs().max().float().item() if want.numel() else 0.0
        error = (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
        if error <= HALF_TOLERANCE[want.dtype] * max(scale, 1e-6):
            return None
        return f"max difference {error:.3g} over max value {scale:.3g}"
    # atol scales with the tensor's largest value: a weight gradient sums T*B products, and its
    # small elements carry the rounding error of its large ones
    rtol, atol = (RTOL_FLOAT64, ATOL_FLOAT64) if want.dtype == torch.float64 else (RTOL, ATOL)
    atol = atol * max(1.0, want.abs().max().item()) if want.numel() else atol
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    except (AssertionError, TypeError) as err:
        return " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return None


def _sync_for(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic garbage collector off while timing (as ``timeit`` does): a collection
    walks every object of the process, torch's included, and would land inside a timed call;
    it runs once before instead."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def best_times(
    steps: Sequence[Step], policy: RepeatPolicy, sync: Callable[[], None]
) -> tuple[list[float], int]:
    """Times the steps interleaved, repeat by repeat, with the garbage collector paused; each
    one's best time (s) and the count."""
    with paused_gc():
        return _best_times(steps, policy, sync)


def _best_times(
    steps: Sequence[Step], policy: RepeatPolicy, sync: Callable[[], None]
) -> tuple[list[float], int]:

    def once(step: Step) -> float:
        if step.reset is not None:
            step.reset()
        sync()
        start = time.perf_counter()
        step.run()
        sync()
        return time.perf_counter() - start

    for _ in range(policy.warmup):
        for step in steps:
            once(step)
    best = [float("inf")] * len(steps)
    spent = [0.0] * len(steps)
    repeats = 0
    while repeats < policy.min_repeats or (
        repeats < policy.max_repeats and max(spent) < policy.budget_s
    ):
        for i, step in enumerate(steps):
            seconds = once(step)
            best[i] = min(best[i], seconds)
            spent[i] += seconds
        repeats += 1
    return best, repeats


def _pass_step(module: nn.Module, x: Tensor, hx: State, pass_name: str) -> Step:
    """The timed work of one pass on one module."""
    if pass_name == "fwd":

        def forward() -> object:
            with torch.no_grad():
                return module(x, hx)

        return Step(forward)
    leaf = x.detach().clone().requires_grad_(True)
    params = list(module.parameters())

    def clear_grads() -> None:
        leaf.grad = None
        for param in params:
            param.grad = None

    def forward_backward() -> None:
        _loss(module(leaf, hx)).backward()

    return Step(forward_backward, clear_grads)


class GemmRates:
    """``torch.mm`` FLOP/s per product shape: measured on first use in each round, the best kept."""

    def __init__(
        self,
        dtype: torch.dtype,
        device: torch.device,
        policy: RepeatPolicy,
        sync: Callable[[], None],
    ) -> None:
        self.dtype = dtype
        self.device = device
        self.policy = policy
        self.sync = sync
        self._rates: dict[Shape, float] = {}
        self._measured: set[Shape] = set()  # shapes measured in the current round

    def new_round(self) -> None:
        """Makes the next use of each shape measure it again."""
        self._measured.clear()

    def rate(self, shape: Shape) -> float:
        """Best FLOP/s of ``torch.mm`` on ``[M, K] x [K, N]`` for ``shape = (M, K, N)``."""
        if shape not in self._measured:
            m, k, n = shape
            a = torch.randn(m, k, dtype=self.dtype, device=self.device)
            b = torch.randn(k, n, dtype=self.dtype, device=self.device)
            (seconds,), _ = best_times([Step(lambda: torch.mm(a, b))], self.policy, self.sync)
            self._rates[shape] = max(self._rates.get(shape, 0.0), gemm_flops(shape) / seconds)
            self._measured.add(shape)
        return self._rates[shape]

    def measure(self, config: Config) -> None:
        """Measures (once per round) the shapes of ``config``'s layers."""
        for shape in config.gemm_shapes():
            self.rate(shape)

    def efficiency(self, config: Config, pass_name: str, seconds: float) -> float:
        """Time ``torch.mm`` needs for the pass's FLOPs divided by ``seconds``."""
        ideal = sum(gemm_flops(shape) / self.rate(shape) for shape in config.gemm_shapes())
        return ideal * config.directions * PASS_FLOP_FACTOR[pass_name] / seconds


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where readable, else what ``platform`` reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, dtype_name: str) -> Record:
    """Fields describing the machine and software, added to every record."""
    device_name = "cpu"
    extra: Record = {}
    if device.type == "cpu" and dtype_name == "bfloat16":
        extra = {"cpu_bf16_products": rnnext.functional.cpu_bf16_products()}
    if device.type == "cuda":
        device_name = f"cuda ({torch.cuda.get_device_name(device)})"
        extra = {
            "cuda_version": torch.version.cuda,
            "cudnn_version": torch.backends.cudnn.version(),
            "tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    return {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "torch_version": torch.__version__,
        "rnnext_version": rnnext.__version__,
        "threads": torch.get_num_threads(),
        "device": device_name,
        "dtype": dtype_name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


@dataclasses.dataclass
class Trial:
    """One configuration's records and timed steps (``[torch.nn, rnnext]`` per pass, none when
    the results disagreed), kept from round to round."""

    config: Config
    records: list[Record]
    steps: dict[str, list[Step]]
    # the agreement check again (on CUDA after the timing, when rnnext replays graphs)
    recheck: Callable[[], str | None] | None = None


def prepare_config(
    config: Config, *, dtype: torch.dtype, device: torch.device, seed: int, machine: Record
) -> Trial:
    """Builds one configuration's modules and inputs and checks that their results agree."""
    records = [
        {
            "config": config.label,
            "cell": config.cell,
            "T": config.seq_len,
            "B": config.batch,
            "I": config.in_size,
            "H": config.hidden_size,
            "layers": config.layers,
            "bidirectional": config.bidirectional,
            "pass": pass_name,
            "flops": config.forward_flops() * PASS_FLOP_FACTOR[pass_name],
            "torch_ms": None,
            "rnnext_ms": None,
            "ratio": None,
            "gemm_efficiency": None,
            "repeats": 0,
            "rounds": 0,
            "agree": None,
            "status": "ok",
            "note": "",
            **machine,
        }
        for pass_name in PASSES
    ]
    reference, fused = build_pair(config, dtype, device, seed)
    x, hx = make_inputs(config, dtype, device, seed)
    # torch.nn's bfloat16 GRU and RNN on the CPU sum their bias gradients step by step in
    # bfloat16: at 500x8x128, 3-5% of the gradient's scale off the float64 result (rnnext's:
    # 0.2%), tens of percent with this check's weighted loss. They are checked against
    # torch.nn in float32 on the same bfloat16 values instead.
    oracle = reference
    if device.type == "cpu" and dtype == torch.bfloat16:
        oracle = copy.deepcopy(reference).float()
    mismatch = check_agreement(oracle, fused, x, hx)
    if mismatch is not None:
        for record in records:
            record.update(status="MISMATCH", agree=False, note=mismatch)
        return Trial(config, records, {})
    steps = {
        pass_name: [_pass_step(module, x, hx, pass_name) for module in (reference, fused)]
        for pass_name in PASSES
    }
    return Trial(config, records, steps, lambda: check_agreement(oracle, fused, x, hx))


def recheck_after_timing(trial: Trial) -> None:
    """Checks agreement once more after the timed rounds: on CUDA the timed rnnext calls
    replayed CUDA graphs, which the first check (eager calls) did not cover. A disagreement
    there marks the configuration MISMATCH and drops its times."""
    if not trial.steps or trial.recheck is None:
        return
    mismatch = trial.recheck()
    if mismatch is not None:
        for record in trial.records:
            record.update(
                status="MISMATCH",
                agree=False,
                note=f"after timing: {mismatch}",
                torch_ms=None,
                rnnext_ms=None,
            )


def time_round(trial: Trial, policy: RepeatPolicy, sync: Callable[[], None]) -> None:
    """Times the trial's passes for one round; each side keeps its best time of all rounds."""
    for record in trial.records:
        if record["pass"] not in trial.steps:
            continue
        (torch_s, rnnext_s), repeats = best_times(trial.steps[record["pass"]], policy, sync)
        for key, seconds in (("torch_ms", torch_s), ("rnnext_ms", rnnext_s)):
            record[key] = min(seconds * 1e3, record[key] or float("inf"))
        record.update(repeats=record["repeats"] + repeats, rounds=record["rounds"] + 1, agree=True)


def finish_records(trial: Trial, gemm: GemmRates) -> list[Record]:
    """The trial's records with ratios and GEMM efficiencies from the best times."""
    for record in trial.records:
        if record["rnnext_ms"] is not None:
            record.update(
                ratio=record["torch_ms"] / record["rnnext_ms"],
                gemm_efficiency=gemm.efficiency(
                    trial.config, record["pass"], record["rnnext_ms"] / 1e3
                ),
            )
    return trial.records


Item = TypeVar("Item")


def _progress(items: Sequence[Item], label: Callable[[Item], str]) -> Iterator[Item]:
    """Yields the items while showing progress on stderr (tqdm, or a plain counter)."""
    try:
        from tqdm import tqdm
    except ImportError:
        print("note: tqdm is not installed; plain progress counter", file=sys.stderr)
        for index, item in enumerate(items, 1):
            print(f"[{index}/{len(items)}] {label(item)}", file=sys.stderr, flush=True)
            yield item
        return
    with tqdm(items, file=sys.stderr, unit="config", dynamic_ncols=True) as bar:
        for item in bar:
            bar.set_postfix_str(label(item))
            yield item


def _number(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``-`` when missing."""
    return "-" if value is None else format(value, spec)


def format_table(records: Sequence[Record]) -> str:
    """Aligned text table of the records, followed by the notes of skipped configurations."""
    headers = ["cell", "T", "B", "I", "H", "layers", "bidir", "pass", "torch.nn ms", "rnnext ms"]
    headers += ["ratio", "GEMM eff", "status"]
    left = {"cell", "bidir", "pass", "status"}
    rows = [
        [
            r["cell"],
            *(str(r[key]) for key in ("T", "B", "I", "H", "layers")),
            "yes" if r["bidirectional"] else "no",
            r["pass"],
            _number(r["torch_ms"], ".2f"),
            _number(r["rnnext_ms"], ".2f"),
            _number(r["ratio"], ".2f"),
            _number(r["gemm_efficiency"], ".1%"),
            r["status"],
        ]
        for r in records
    ]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if header in left else cell.rjust(width)
            for cell, width, header in zip(cells, widths, headers)
        ).rstrip()

    lines = [line(headers), line(["-" * width for width in widths])]
    lines += [line(row) for row in rows]
    notes = {r["config"]: f"{r['status']}: {r['note']}" for r in records if r["note"]}
    if notes:
        lines += ["", "Not timed:"] + [f"  {label}: {note}" for label, note in notes.items()]
    return "\n".join(lines)


def plot_ratios(records: Sequence[Record], path: Path, title: str) -> str:
    """Writes a bar chart of torch.nn time / rnnext time to ``path``; returns what it did."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "note: matplotlib is not installed; no plot written"
    timed = [r for r in records if r["ratio"] is not None]
    if not timed:
        return "note: no configuration was timed; no plot written"
    labels = list(dict.fromkeys(r["config"] for r in timed))
    ratios = {(r["config"], r["pass"]): r["ratio"] for r in timed}
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(labels) + 2.0), 5.0))
    for offset, pass_name in zip((-width / 2, width / 2), PASSES):
        bars = ax.bar(
            [index + offset for index in range(len(labels))],
            [ratios[(label, pass_name)] for label in labels],
            width,
            label=pass_name,
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    values = [*ratios.values(), 1.0]
    low, high = min(values) / 1.6, max(values) * 1.6
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    ax.set_yticks([tick for tick in RATIO_TICKS if low <= tick <= high])
    ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([label.replace(" ", "\n") for label in labels], fontsize=8)
    ax.set_ylabel("torch.nn time / rnnext time (log; > 1: rnnext faster)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def _parse_sizes(text: str) -> list[Shape]:
    """``"1000x1x32,500x8x128"`` to ``[(1000, 1, 32), (500, 8, 128)]``."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise argparse.ArgumentTypeError(f"bad size {item!r}; expected TxBxH, e.g. 500x8x128")
        t, b, h = (int(part) for part in parts)
        sizes.append((t, b, h))
    return sizes


def _parse_cells(text: str) -> list[str]:
    """Comma list of cell names, checked against CELLS."""
    cells = [cell.strip() for cell in text.split(",")]
    for cell in cells:
        if cell not in CELLS:
            raise argparse.ArgumentTypeError(f"unknown cell {cell!r}; choose from {CELLS}")
    return cells


def _parse_layers(text: str) -> list[int]:
    """Comma list of positive layer counts."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"bad layer list {text!r}; expected e.g. 1,2")
    return [int(part) for part in parts]


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m rnnext.bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m rnnext.bench",
        description="Time rnnext's RNN/GRU/LSTM against torch.nn in the same process.",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--cells",
        type=_parse_cells,
        default=list(DEFAULT_CELLS),
        help=f"comma list from {','.join(CELLS)} (default: {','.join(DEFAULT_CELLS)})",
    )
    parser.add_argument(
        "--sizes",
        type=_parse_sizes,
        help="comma list of TxBxH (sequence length, batch, hidden size; input size = H); "
        "default: " + ",".join("x".join(map(str, size)) for size in DEFAULT_SIZES),
    )
    parser.add_argument(
        "--layers", type=_parse_layers, help="comma list of layer counts to run (default: 1)"
    )
    parser.add_argument(
        "--bidirectional",
        action="store_true",
        help="also run a bidirectional variant of every configuration",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"timed repeats per side and round (default: adaptive, {MIN_REPEATS} to "
        f"{MAX_REPEATS}, until {BUDGET_S} s per side)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"passes through all configurations, best time of all kept (default: {ROUNDS}; "
        "1 with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and few repeats, for a smoke test"
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="float32 (default), float64, bfloat16 (on the CPU: modules converted with "
        ".bfloat16(), see rnnext.functional.cpu_bf16_products); float16 on CUDA",
    )
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="CUDA float32: let cuDNN and rnnext's GEMMs use TF32 (default: both off)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="directory for bench.json and bench.png (default: bench-results/)",
    )
    parser.add_argument("--seed", type=int, default=0, help="weights and inputs seed")
    return parser


def configs_from_args(args: argparse.Namespace) -> list[Config]:
    """The configurations the parsed options ask for (see ``--help``)."""
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    directions = (False, True) if args.bidirectional else (False,)
    configs = [
        Config(cell, t, b, h, layers, bidirectional)
        for cell in args.cells
        for t, b, h in sizes
        for layers in args.layers or [1]
        for bidirectional in directions
    ]
    if args.sizes is None and args.layers is None and not args.bidirectional:
        t, b, h = QUICK_EXTRA_SIZE if args.quick else EXTRA_SIZE
        configs += [
            Config(cell, t, b, h, EXTRA_LAYERS, True) for cell in args.cells if cell in EXTRA_CELLS
        ]
    return configs


def run(argv: Sequence[str] | None = None) -> list[Record]:
    """Runs the benchmark for command-line ``argv``; prints and writes results, returns them."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.dtype == "float16" and args.device != "cuda":
        parser.error("--dtype float16 needs --device cuda")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    for option in ("threads", "repeats", "rounds"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rounds = args.rounds if args.rounds is not None else 1 if args.quick else ROUNDS
    if args.repeats is not None:
        policy = RepeatPolicy(args.repeats, args.repeats, rounds=rounds)
    elif args.quick:
        policy = RepeatPolicy(QUICK_REPEATS, QUICK_REPEATS, rounds=rounds)
    else:
        policy = RepeatPolicy(rounds=rounds)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    machine = machine_info(device, args.dtype)
    sync = _sync_for(device)
    gemm = GemmRates(dtype, device, policy, sync)
    configs = configs_from_args(args)
    trials: list[Trial] = []
    work = [
        (round_index, index)
        for round_index in range(policy.rounds)
        for index in range(len(configs))
    ]

    def label(item: tuple[int, int]) -> str:
        return f"round {item[0] + 1}/{policy.rounds} {configs[item[1]].label}"

    for round_index, index in _progress(work, label):
        if index == 0:
            gemm.new_round()
        if round_index == 0:
            trials.append(
                prepare_config(
                    configs[index], dtype=dtype, device=device, seed=args.seed, machine=machine
                )
            )
        trial = trials[index]
        if trial.steps:
            # in the first round the agreement check just ran each pass: that was the warm-up
            warmup = 0 if round_index == 0 else policy.warmup
            time_round(trial, dataclasses.replace(policy, warmup=warmup), sync)
            gemm.measure(trial.config)
    if device.type == "cuda":
        for trial in trials:
            recheck_after_timing(trial)
    records = [record for trial in trials for record in finish_records(trial, gemm)]
    print(format_table(records))
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "bench.json"
    json_path.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {json_path}")
    title = (
        f"rnnext {rnnext.__version__} vs torch.nn {torch.__version__}: "
        f"{machine['device']}, {args.dtype}, {machine['threads']} threads"
    )
    print(plot_ratios(records, args.out / "bench.png", title))
    return records


def main() -> None:
    """Entry point of ``python -m rnnext.bench``; exits with status 1 if results disagree."""
    if any(record["agree"] is False for record in run()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
