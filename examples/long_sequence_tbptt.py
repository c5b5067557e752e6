"""Train an LSTM on one sequence far longer than fits in memory, with truncated BPTT.

The sequence is a noisy mixture of slow oscillations, produced chunk by chunk by a generator:
it never exists in memory as a whole, and memory use stays the same whatever its length
(--steps 10000000000 would be 320 GB as one float32 tensor of 8 rows; it just runs longer).
The model predicts the next value; rnnext.TruncatedBPTT carries the LSTM state from chunk to
chunk and cuts the gradient at chunk borders.

    python examples/long_sequence_tbptt.py --steps 2000000 --chunk 500
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator

import torch
from torch import nn

import rnnext


def signal_chunks(batch: int, steps: int, chunk: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Yields [batch, chunk + 1, 1] windows of an endless signal (each overlaps the next by one
    step, so that inputs and next-step targets line up), for `steps` steps in all."""
    gen = torch.Generator().manual_seed(seed)
    periods = torch.tensor([97.0, 389.0, 1531.0])
    phase = torch.rand(batch, 3, generator=gen) * 2 * math.pi
    t0 = 0
    while t0 < steps:
        t = torch.arange(t0, t0 + chunk + 1, dtype=torch.float32)
        waves = torch.sin(2 * math.pi * t[None, :, None] / periods + phase[:, None, :])
        noise = 0.05 * torch.randn(batch, chunk + 1, generator=gen)
        yield (waves.sum(-1) / 3 + noise).unsqueeze(-1)
        t0 += chunk


def train(steps: int, chunk: int, batch: int = 8, hidden: int = 64, log_every: int = 0):
    """Returns the mean loss of the first and of the last tenth of the chunks."""
    torch.manual_seed(0)
    lstm = rnnext.LSTM(1, hidden, batch_first=True)
    head = nn.Linear(hidden, 1)
    optimiser = torch.optim.Adam([*lstm.parameters(), *head.parameters()], lr=3e-3)
    runner = rnnext.TruncatedBPTT(lstm)
    losses = []
    start = time.perf_counter()
    for k, window in enumerate(signal_chunks(batch, steps, chunk)):
        x, y = window[:, :-1], window[:, 1:]
        loss = nn.functional.mse_loss(head(runner(x)), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if log_every and k % log_every == 0:
            rate = (k + 1) * chunk * batch / (time.perf_counter() - start)
            print(f"step {(k + 1) * chunk:>10}  loss {loss.item():.4f}  ({rate:,.0f} steps/s)")
    tenth = max(1, len(losses) // 10)
    return sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2_000_000, help="sequence length")
    parser.add_argument("--chunk", type=int, default=500, help="TBPTT chunk length")
    args = parser.parse_args()
    first, last = train(args.steps, args.chunk, log_every=max(1, args.steps // args.chunk // 20))
    print(f"mean loss: first tenth {first:.4f}, last tenth {last:.4f}")


if __name__ == "__main__":
    main()
