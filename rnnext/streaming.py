"""Streaming and truncated backpropagation through time (TBPTT).

rnnext's modules carry state exactly: running a sequence in chunks, passing each call's final
state to the next, gives the same outputs as one call over the whole sequence.
:class:`TruncatedBPTT` does that bookkeeping for training on sequences too long for one
backward pass, or too long to exist in memory at all: it keeps the state between chunks and
cuts its gradient history at each chunk border.

Example::

    lstm = rnnext.LSTM(1, 64, batch_first=True)
    head = torch.nn.Linear(64, 1)
    runner = rnnext.TruncatedBPTT(lstm)
    for x, y in stream_of_chunks():  # each [B, chunk, 1]; the stream may be endless
        loss = F.mse_loss(head(runner(x)), y)
        optimiser.zero_grad()
        loss.backward()  # back through this chunk only
        optimiser.step()
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

Tensor = torch.Tensor


def _detach(state):
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


class TruncatedBPTT:
    """Runs a recurrent module over consecutive chunks of one long sequence.

    Each call feeds ``chunk`` with the state the previous call ended in, then keeps the new
    state detached from the graph: gradients flow within a chunk, never across a border. The
    first call (and the first after :meth:`reset`) starts from the module's default zero state.

    Args:
        module: an rnnext or torch.nn RNN, GRU or LSTM (any module with their call signature),
            unidirectional: a bidirectional layer's reverse direction would start again at the
            end of every chunk, so chunks could not add up to one call.
    """

    def __init__(self, module: nn.Module):
        if getattr(module, "bidirectional", False):
            raise ValueError(
                "TruncatedBPTT: module must be unidirectional (a bidirectional layer's reverse "
                "direction needs the whole sequence), got bidirectional=True"
            )
        self.module = module
        self.state: Tensor | tuple[Tensor, Tensor] | None = None

    def __call__(self, chunk: Tensor, **kwargs) -> Tensor:
        """Runs ``chunk`` (the module's input layout); returns its output. Keyword arguments
        (for example ``lengths`` of an rnnext module) go to the module."""
        output, state = self.module(chunk, self.state, **kwargs)
        self.state = _detach(state)
        return output

    def reset(self) -> None:
        """Forgets the state: the next chunk starts a new sequence."""
        self.state = None

    @staticmethod
    def split(sequence: Tensor, chunk_size: int, time_dim: int = 0) -> Iterator[Tensor]:
        """Consecutive chunks of ``chunk_size`` steps along ``time_dim`` (the last may be
        shorter); views, no copies."""
        if chunk_size < 1:
            raise ValueError(f"TruncatedBPTT.split: chunk_size must be >= 1, got {chunk_size}")
        yield from sequence.split(chunk_size, dim=time_dim)
