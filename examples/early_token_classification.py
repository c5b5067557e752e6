"""Which pooling carries an early token to the end? Classification with long-range memory.

Each sequence holds one class token (4 classes) at a random position among its first 5 steps,
followed by distractor tokens up to its own length (lengths vary from T/2 to T, passed as
``lengths=``). A rnnext.SequenceClassifier (RNN, GRU or LSTM; last-state, mean or attention
pooling) learns the class; the script prints held-out accuracy against T for every
combination and plots it.

    python examples/early_token_classification.py          # about a minute on 2 cores
"""

from __future__ import annotations

import time

import torch
from _common import parser, pyplot, save, save_figure

import rnnext

CLASSES, VOCAB, EARLY = 4, 24, 5


def make_batch(batch: int, T: int, gen: torch.Generator):
    """Tokens [batch, T], lengths [batch], labels [batch]."""
    tokens = torch.randint(CLASSES, VOCAB, (batch, T), generator=gen)  # distractors
    labels = torch.randint(0, CLASSES, (batch,), generator=gen)
    position = torch.randint(0, EARLY, (batch,), generator=gen)
    tokens[torch.arange(batch), position] = labels
    lengths = torch.randint(max(T // 2, EARLY), T + 1, (batch,), generator=gen)
    return tokens, lengths, labels


def train_and_test(cell: str, pooling: str, T: int, steps: int, seed: int) -> float:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = rnnext.SequenceClassifier(cell, 16, 32, CLASSES, pooling=pooling, vocab_size=VOCAB)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        tokens, lengths, labels = make_batch(64, T, gen)
        loss = torch.nn.functional.cross_entropy(model(tokens, lengths), labels)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
    tokens, lengths, labels = make_batch(1024, T, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        return (model(tokens, lengths).argmax(1) == labels).float().mean().item()


def main(argv=None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    lengths = [10, 20] if args.quick else [25, 50, 100, 200]
    steps = 3 if args.quick else 300
    cells, poolings = ("rnn", "gru", "lstm"), rnnext.pooling.POOLINGS
    accuracy: dict[str, dict[str, list[float]]] = {c: {p: [] for p in poolings} for c in cells}
    start = time.perf_counter()
    print(f"held-out accuracy (chance {1 / CLASSES:.2f}), {steps} training steps of 64")
    print(f"{'cell':5} {'pooling':10}" + "".join(f"  T={T:<5}" for T in lengths))
    for cell in cells:
        for pooling in poolings:
            for T in lengths:
                accuracy[cell][pooling].append(train_and_test(cell, pooling, T, steps, args.seed))
            row = "".join(f"  {a:7.2f}" for a in accuracy[cell][pooling])
            print(f"{cell:5} {pooling:10}{row}", flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")
    results = {"sequence_lengths": lengths, "steps": steps, "accuracy": accuracy}
    save(args.out, "early_token_classification", results)
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(cells), figsize=(12, 3.6), sharey=True)
        for ax, cell in zip(axes, cells):
            for pooling in poolings:
                ax.plot(lengths, accuracy[cell][pooling], marker="o", label=pooling)
            ax.axhline(1 / CLASSES, color="grey", linestyle=":", label="chance")
            ax.set(title=f"rnnext {cell.upper()}", xlabel="sequence length T", xscale="log")
            ax.set_xticks(lengths, [str(T) for T in lengths])
            ax.minorticks_off()
        axes[0].set_ylabel("held-out accuracy")
        axes[0].legend()
        fig.suptitle("class set by a token in the first 5 steps, then distractors")
        save_figure(fig, args.out, "early_token_classification")
    return results


if __name__ == "__main__":
    main()
