"""Small helpers shared by the examples: argument parsing, results folder, optional plots."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    p.add_argument("--out", type=Path, default=Path("example-results"), help="results folder")
    p.add_argument("--seed", type=int, default=0)
    return p


def save(out: Path, name: str, results: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return path


def pyplot():
    """matplotlib's pyplot with a file-only backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return None
    return plt


def save_figure(fig, out: Path, name: str) -> Path:
    """Lays out a matplotlib figure and writes it to out/name.png."""
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return path
