"""DistributedDataParallel (gloo, 2 processes on the CPU) with rnnext.LSTM and rnnext.GRU:
after one step, gradients and parameters equal one process's on the whole batch."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rnnext

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

T, B, I, H = 7, 8, 5, 6


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = rnnext.LSTM(I, H, num_layers=2)
        self.gru = rnnext.GRU(H, H, bidirectional=True)
        self.head = torch.nn.Linear(2 * H, 1)

    def forward(self, x):
        return self.head(self.gru(self.lstm(x)[0])[0])


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(T, B, I, generator=gen), torch.randn(T, B, 1, generator=gen)


def _step(model, x, y):
    """One SGD step on the mean squared error; the gradients taken before the step."""
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    return grads


def _worker(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(Model())
        x, y = _data()
        half = slice(rank * B // 2, (rank + 1) * B // 2)  # each process takes half the batch
        grads = _step(model, x[:, half], y[:, half])
        results[rank] = (grads, [p.detach().clone() for p in model.parameters()])
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
        results = dict(results)
    torch.manual_seed(0)
    model = Model()
    grads = _step(model, *_data())
    params = [p.detach() for p in model.parameters()]
    for rank in (0, 1):
        ddp_grads, ddp_params = results[rank]
        for a, b in zip(ddp_grads, grads):
            torch.testing.assert_close(a, b)
        for a, b in zip(ddp_params, params):
            torch.testing.assert_close(a, b)
