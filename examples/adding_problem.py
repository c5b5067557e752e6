"""The adding problem, torch.nn against rnnext (LSTM and GRU): learning curves and wall time.

Each input step holds a random number in [0, 1] and a marker; exactly two steps are marked
(one in each half of the sequence) and the target is the sum of their numbers (many-to-one,
read from the final state). Predicting the mean of that sum gives a mean squared error of
about 0.167, so a loss well under that means the model remembers the marked numbers. For
each cell, the torch.nn and the rnnext model start from the same weights and see the same
batches; the script prints both learning curves' end, the largest difference between them
(float32 rounding, amplified by training), and the time each spent in training steps, and
plots the curves.

    python examples/adding_problem.py          # under a minute on 2 cores
"""

from __future__ import annotations

import time

import torch
from _common import parser, pyplot, save, save_figure
from torch import nn

import rnnext


def make_batch(batch: int, T: int, gen: torch.Generator):
    values = torch.rand(batch, T, generator=gen)
    first = torch.randint(0, T // 2, (batch,), generator=gen)
    second = torch.randint(T // 2, T, (batch,), generator=gen)
    markers = torch.zeros(batch, T)
    rows = torch.arange(batch)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    target = values[rows, first] + values[rows, second]
    return torch.stack([values, markers], dim=-1), target


class Model(nn.Module):
    def __init__(self, rnn: nn.Module, hidden: int):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(hidden, 1)

    def forward(self, x):
        state = self.rnn(x)[1]
        h_n = state[0] if isinstance(state, tuple) else state
        return self.head(h_n[-1]).squeeze(-1)  # from h_T


def train(model: nn.Module, T: int, steps: int, seed: int, log_every: int):
    gen = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    curve, seconds = [], 0.0
    for step in range(1, steps + 1):
        x, y = make_batch(64, T, gen)
        start = time.perf_counter()
        loss = nn.functional.mse_loss(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        seconds += time.perf_counter() - start
        if step % log_every == 0 or step == steps:
            curve.append((step, loss.item()))
    return curve, seconds


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=50, help="sequence length T")
    p.add_argument("--steps", type=int, default=1500)
    args = p.parse_args(argv)
    T, steps, hidden = (10, 4, 8) if args.quick else (args.length, args.steps, 64)
    log_every = max(1, steps // 30)
    results: dict = {"T": T, "steps": steps, "hidden": hidden}
    for cell in ("LSTM", "GRU"):
        torch.manual_seed(args.seed)
        reference = Model(getattr(nn, cell)(2, hidden, batch_first=True), hidden)
        fused = Model(getattr(rnnext, cell)(2, hidden, batch_first=True), hidden)
        fused.load_state_dict(reference.state_dict())
        runs = {}
        for name, model in (("torch.nn", reference), ("rnnext", fused)):
            curve, seconds = train(model, T, steps, args.seed, log_every)
            runs[name] = {"curve": curve, "seconds": seconds}
            print(f"{cell} {name:8}: final loss {curve[-1][1]:.4f}, {seconds:.1f} s of steps")
        pairs = zip(runs["torch.nn"]["curve"], runs["rnnext"]["curve"])
        runs["largest_loss_difference"] = max(abs(a[1] - b[1]) for a, b in pairs)
        runs["time_ratio"] = runs["torch.nn"]["seconds"] / runs["rnnext"]["seconds"]
        print(
            f"{cell}: largest difference between the curves {runs['largest_loss_difference']:.2e}; "
            f"torch.nn time / rnnext time {runs['time_ratio']:.2f}"
        )
        results[cell] = runs
    save(args.out, "adding_problem", results)
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, cell in zip(axes, ("LSTM", "GRU")):
            for name, style in (("torch.nn", "-"), ("rnnext", "--")):
                steps_, losses = zip(*results[cell][name]["curve"])
                label = f"{name} ({results[cell][name]['seconds']:.1f} s)"
                ax.plot(steps_, losses, style, label=label)
            ax.axhline(1 / 6, color="grey", linestyle=":", label="predicting the mean")
            ax.set(xlabel="training step (batch 64)", yscale="log")
            ax.set_title(f"{cell}, adding problem, T = {T}, hidden {hidden}")
            ax.legend()
        axes[0].set_ylabel("mean squared error")
        save_figure(fig, args.out, "adding_problem")
    return results


if __name__ == "__main__":
    main()
