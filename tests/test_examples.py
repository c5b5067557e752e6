"""Each example runs end to end at tiny size (--quick) and writes its results."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    for name in [n for n in sys.modules if n == "_common"]:
        del sys.modules[name]


@pytest.mark.parametrize(
    "name,keys",
    [
        ("early_token_classification", {"accuracy", "sequence_lengths"}),
        ("adding_problem", {"LSTM", "GRU"}),
        ("char_language_model", {"curve", "sample"}),
    ],
)
def test_example_quick_run(name, keys, tmp_path, examples_on_path):
    module = importlib.import_module(name)
    try:
        results = module.main(["--quick", "--out", str(tmp_path)])
    finally:
        del sys.modules[name]
    assert keys <= results.keys()
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert keys <= saved.keys()
    if name == "adding_problem":
        # same weights and batches: the curves agree to float32 rounding
        for cell in ("LSTM", "GRU"):
            assert results[cell]["largest_loss_difference"] < 1e-4
    if name == "early_token_classification":
        # one held-out accuracy per sequence length for every cell and pooling, as saved
        table = results["accuracy"]
        assert table and all(per_cell for per_cell in table.values())
        lengths = results["sequence_lengths"]
        assert all(
            len(row) == len(lengths) for per_cell in table.values() for row in per_cell.values()
        )
        assert saved["accuracy"] == table
