"""A character-level language model on Python's own standard library, trained with
truncated BPTT, then sampling text from it.

The text is the source of the standard library's top-level modules (present wherever Python
is), read in sorted order up to --chars characters. It is cut into 32 parallel streams that
are read chunk by chunk; rnnext.TruncatedBPTT carries the LSTM state from one chunk to the
next and cuts the gradient at each border. The script prints the loss as it trains and a
sample at the end, and plots the loss.

    python examples/char_language_model.py          # about two minutes on 2 cores
"""

from __future__ import annotations

import math
import sysconfig
import time
from pathlib import Path

import torch
from _common import parser, pyplot, save, save_figure
from torch import nn

import rnnext


def stdlib_text(chars: int) -> str:
    """The first `chars` characters of the standard library's top-level .py files."""
    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    return "".join(parts)[:chars]


class CharModel(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 64)
        self.lstm = rnnext.LSTM(64, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, tokens, state=None):
        output, state = self.lstm(self.embed(tokens), state)
        return self.out(output), state


@torch.no_grad()
def sample(model, stoi, itos, prompt: str, length: int, temperature: float, gen) -> str:
    tokens = torch.tensor([[stoi[c] for c in prompt]])
    logits, state = model(tokens)
    text = prompt
    for _ in range(length):
        probs = torch.softmax(logits[0, -1] / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        text += itos[nxt.item()]
        logits, state = model(nxt.view(1, 1), state)
    return text


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--chars", type=int, default=400_000)
    p.add_argument("--chunks", type=int, default=1500, help="training chunks (steps)")
    p.add_argument("--chunk", type=int, default=100, help="steps per chunk")
    args = p.parse_args(argv)
    chars, chunks, chunk, hidden = (
        (20_000, 4, 20, 32) if args.quick else (args.chars, args.chunks, args.chunk, 256)
    )
    torch.manual_seed(args.seed)
    text = stdlib_text(chars)
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    data = torch.tensor([stoi[c] for c in text])
    streams = 32
    per_stream = len(data) // streams
    data = data[: streams * per_stream].view(streams, per_stream)  # [32, L], one row a stream
    print(f"{len(text)} characters of stdlib source, {len(itos)} distinct; {streams} streams")
    model = CharModel(len(itos), hidden)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    runner = rnnext.TruncatedBPTT(model.lstm)
    curve, start, position = [], time.perf_counter(), 0
    for step in range(1, chunks + 1):
        if position + chunk + 1 > per_stream:  # a new pass over the text: fresh state
            position = 0
            runner.reset()
        x = data[:, position : position + chunk]
        y = data[:, position + 1 : position + chunk + 1]
        position += chunk
        logits = model.out(runner(model.embed(x)))
        loss = nn.functional.cross_entropy(logits.reshape(-1, len(itos)), y.reshape(-1))
        optimiser.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        bits = loss.item() / math.log(2)
        curve.append((step, bits))
        if step % max(1, chunks // 10) == 0 or step == chunks:
            print(f"chunk {step:5d}: {bits:.3f} bits per character", flush=True)
    seconds = time.perf_counter() - start
    gen = torch.Generator().manual_seed(args.seed)
    text_out = sample(model, stoi, itos, "def ", 40 if args.quick else 400, 0.8, gen)
    print(f"\ntrained {chunks} chunks of {streams}x{chunk} characters in {seconds:.0f} s")
    print("sample (temperature 0.8):\n" + "-" * 60 + "\n" + text_out + "\n" + "-" * 60)
    results = {"chars": len(text), "chunks": chunks, "chunk": chunk, "hidden": hidden}
    results.update(seconds=seconds, curve=curve, sample=text_out)
    save(args.out, "char_language_model", results)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.plot(*zip(*curve))
        ax.set(xlabel=f"chunk ({streams} streams x {chunk} characters)", ylabel="bits per char")
        ax.set_title("character LSTM on Python's standard library, truncated BPTT")
        save_figure(fig, args.out, "char_language_model")
    return results


if __name__ == "__main__":
    main()
