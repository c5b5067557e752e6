"""The benchmark's bookkeeping: agreement check, best of rounds, ratios and written files."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from rnnext import bench, functional


def test_quick_run_writes_consistent_records(tmp_path):
    records = bench.run(
        ["--quick", "--cells", "gru", "--rounds", "2", "--repeats", "2", "--out", str(tmp_path)]
    )
    configs = bench.configs_from_args(
        bench.build_parser().parse_args(["--quick", "--cells", "gru"])
    )
    assert len(records) == len(configs) * len(bench.PASSES)
    for record in records:
        assert record["agree"] is True and record["status"] == "ok"
        assert record["rounds"] == 2 and record["repeats"] == 4
        assert record["torch_ms"] > 0 and record["rnnext_ms"] > 0
        assert record["ratio"] == pytest.approx(record["torch_ms"] / record["rnnext_ms"])
        assert record["gemm_efficiency"] > 0
    written = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(records))


def test_bfloat16_on_the_cpu_agrees_and_is_timed(tmp_path):
    """--dtype bfloat16 on the CPU: every cell agrees (rnnext against torch.nn in float32 on the
    bfloat16 values, since torch.nn's own bfloat16 GRU and RNN bias gradients are far off) and
    is timed; the records say whether the products ran in bfloat16."""
    args = ["--quick", "--dtype", "bfloat16", "--rounds", "1", "--repeats", "1"]
    records = bench.run([*args, "--out", str(tmp_path)])
    assert {r["cell"] for r in records} == {"rnn_tanh", "gru", "lstm"}
    for record in records:
        assert record["status"] == "ok" and record["dtype"] == "bfloat16"
        assert record["cpu_bf16_products"] == functional.cpu_bf16_products()
        assert record["torch_ms"] > 0 and record["rnnext_ms"] > 0


def test_each_side_keeps_its_best_round(monkeypatch):
    config = bench.Config("gru", 4, 2, 8)
    machine = bench.machine_info(torch.device("cpu"), "float32")
    trial = bench.prepare_config(
        config, dtype=torch.float32, device=torch.device("cpu"), seed=0, machine=machine
    )
    # per call (round by round, pass by pass): (torch.nn s, rnnext s), repeats
    first, second = ((0.002, 0.004), 3), ((0.003, 0.001), 2)
    results = iter([first] * len(bench.PASSES) + [second] * len(bench.PASSES))
    monkeypatch.setattr(bench, "best_times", lambda steps, policy, sync: next(results))
    for _ in range(2):
        bench.time_round(trial, bench.RepeatPolicy(), lambda: None)
    for record in trial.records:
        assert record["torch_ms"] == pytest.approx(2.0)
        assert record["rnnext_ms"] == pytest.approx(1.0)
        assert record["repeats"] == 5 and record["rounds"] == 2


def test_disagreeing_results_are_not_timed(monkeypatch, tmp_path):
    build_pair = bench.build_pair

    def broken_pair(*args, **kwargs):
        reference, fused = build_pair(*args, **kwargs)
        with torch.no_grad():
            fused.weight_hh_l0.add_(0.1)
        return reference, fused

    monkeypatch.setattr(bench, "build_pair", broken_pair)
    argv = ["--quick", "--cells", "lstm", "--sizes", "5x2x4", "--out", str(tmp_path)]
    records = bench.run(argv)
    assert records and all(r["status"] == "MISMATCH" and r["agree"] is False for r in records)
    assert all(r["ratio"] is None and r["rnnext_ms"] is None for r in records)
    monkeypatch.setattr("sys.argv", ["bench", *argv])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 1


def test_gemm_rates_measure_once_per_round_and_keep_the_best(monkeypatch):
    seconds = iter([0.004, 0.002, 0.008])  # one measurement per round
    calls = []

    def fake_best_times(steps, policy, sync):
        calls.append(len(steps))
        return [next(seconds)], 1

    monkeypatch.setattr(bench, "best_times", fake_best_times)
    gemm = bench.GemmRates(torch.float32, torch.device("cpu"), bench.RepeatPolicy(), lambda: None)
    shape = (4, 3, 2)
    flops = bench.gemm_flops(shape)
    for expected in (flops / 0.004, flops / 0.002, flops / 0.002):
        gemm.new_round()
        assert gemm.rate(shape) == pytest.approx(expected)
        assert gemm.rate(shape) == pytest.approx(expected)  # cached within the round
    assert len(calls) == 3


def test_timed_calls_run_with_the_garbage_collector_paused():
    """A collection inside a timed call would add the walk over every object to its time."""
    seen = []
    step = bench.Step(lambda: seen.append(gc.isenabled()))
    policy = bench.RepeatPolicy(warmup=0, min_repeats=2, max_repeats=2)
    assert gc.isenabled()
    bench.best_times([step], policy, lambda: None)
    assert seen == [False, False]
    assert gc.isenabled()


def test_a_disagreement_after_timing_drops_the_times():
    """The check that runs again after the timed rounds (on CUDA, on replayed graphs) turns a
    disagreement into MISMATCH without times; agreement leaves the records as they were."""
    config = bench.Config("gru", 4, 2, 8)
    machine = bench.machine_info(torch.device("cpu"), "float32")
    trial = bench.prepare_config(
        config, dtype=torch.float32, device=torch.device("cpu"), seed=0, machine=machine
    )
    bench.time_round(
        trial, bench.RepeatPolicy(warmup=0, min_repeats=1, max_repeats=1), lambda: None
    )
    bench.recheck_after_timing(trial)  # the real check: the modules agree
    assert all(r["status"] == "ok" and r["rnnext_ms"] > 0 for r in trial.records)
    trial.recheck = lambda: "fwd output: differs"
    bench.recheck_after_timing(trial)
    for record in trial.records:
        assert record["status"] == "MISMATCH" and record["agree"] is False
        assert record["note"] == "after timing: fwd output: differs"
        assert record["torch_ms"] is None and record["rnnext_ms"] is None
