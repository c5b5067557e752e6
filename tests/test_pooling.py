"""Pooling functions against plain per-sequence PyTorch, masks, gradients, the classifier."""

from __future__ import annotations

import pytest
import torch

import rnnext
from rnnext import pooling

LENGTHS = [5, 0, 3, 1]


def _case(batch_first=False, features=6, device="cpu"):
    torch.manual_seed(0)
    T, B = 5, len(LENGTHS)
    output = torch.randn(T, B, features, dtype=torch.float64, device=device)
    lengths = torch.tensor(LENGTHS)
    if batch_first:
        output = output.transpose(0, 1).contiguous()
    return output, lengths


def _rows(output, batch_first):
    """Per sequence, its valid hidden states [len, F], by plain indexing."""
    out = output.transpose(0, 1) if batch_first else output
    return [out[:n, b] for b, n in enumerate(LENGTHS)]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_last_state(batch_first, bidirectional, device):
    output, lengths = _case(batch_first, device=device)
    got = pooling.last_state(output, lengths, batch_first=batch_first, bidirectional=bidirectional)
    out = output.transpose(0, 1) if batch_first else output
    for b, n in enumerate(LENGTHS):
        if n == 0:
            expected = torch.zeros(6, dtype=output.dtype, device=device)
        elif bidirectional:
            expected = torch.cat([out[n - 1, b, :3], out[0, b, 3:]])
        else:
            expected = out[n - 1, b]
        torch.testing.assert_close(got[b], expected)


@pytest.mark.parametrize("batch_first", [False, True])
def test_mean_pool(batch_first, device):
    output, lengths = _case(batch_first, device=device)
    got = pooling.mean_pool(output, lengths, batch_first=batch_first)
    for b, rows in enumerate(_rows(output, batch_first)):
        expected = rows.mean(0) if len(rows) else torch.zeros_like(got[b])
        torch.testing.assert_close(got[b], expected)


@pytest.mark.parametrize("batch_first", [False, True])
def test_attention_pool(batch_first, device):
    output, lengths = _case(batch_first, device=device)
    W = torch.randn(4, 6, dtype=torch.float64, device=device)
    v = torch.randn(4, dtype=torch.float64, device=device)
    got, alpha = pooling.attention_pool(
        output, W, v, lengths, batch_first=batch_first, return_weights=True
    )
    alpha_tb = alpha.t() if batch_first else alpha
    for b, rows in enumerate(_rows(output, batch_first)):
        if len(rows) == 0:
            torch.testing.assert_close(got[b], torch.zeros_like(got[b]))
            assert alpha_tb[:, b].abs().sum() == 0
            continue
        weights = torch.softmax(torch.tanh(rows @ W.t()) @ v, dim=0)
        torch.testing.assert_close(got[b], weights @ rows)
        torch.testing.assert_close(alpha_tb[: len(rows), b], weights)
        assert alpha_tb[len(rows) :, b].abs().sum() == 0


def _pools(W, v):
    return {
        "last": lambda o, n: pooling.last_state(o, n, bidirectional=True),
        "mean": lambda o, n: pooling.mean_pool(o, n),
        "attention": lambda o, n: pooling.attention_pool(o, W, v, n),
    }


@pytest.mark.parametrize("name", ["last", "mean", "attention"])
def test_padding_is_never_read_and_gets_no_gradient(name):
    output, lengths = _case()
    W, v = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    pool = _pools(W, v)[name]
    padded = output.clone()
    past_end = ~pooling.valid_mask(output, lengths)
    padded[past_end] = 1e6 * torch.randn(int(past_end.sum()), 6, dtype=torch.float64)
    torch.testing.assert_close(pool(padded, lengths), pool(output, lengths))
    leaf = padded.requires_grad_()
    (grad,) = torch.autograd.grad(pool(leaf, lengths).sum(), leaf)
    assert grad[past_end].abs().sum() == 0


@pytest.mark.parametrize("name", ["last", "mean", "attention"])
def test_gradcheck(name):
    output, lengths = _case()
    W = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, dtype=torch.float64, requires_grad=True)
    output.requires_grad_()

    def pool(o, W_, v_):
        return _pools(W_, v_)[name](o, lengths)

    assert torch.autograd.gradcheck(pool, (output, W, v))


def test_without_lengths_every_step_counts():
    output, _ = _case()
    torch.testing.assert_close(pooling.mean_pool(output), output.mean(0))
    torch.testing.assert_close(pooling.last_state(output), output[-1])


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("pool", ["last", "mean", "attention"])
def test_sequence_classifier_compiles_and_matches_eager(cell, pool, device):
    torch.manual_seed(0)
    model = rnnext.SequenceClassifier(
        cell, 8, 12, 3, pooling=pool, vocab_size=20, bidirectional=True
    ).to(device)
    tokens = torch.randint(0, 20, (4, 7), device=device)
    lengths = torch.tensor([7, 2, 5, 3])
    eager = model(tokens, lengths)
    assert eager.shape == (4, 3)
    torch._dynamo.reset()  # a fresh cache per model: nine models would pass the recompile limit
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(tokens, lengths), eager)
    # padding tokens past each length change nothing
    noisy = tokens.clone()
    noisy[1, 2:] = 19
    torch.testing.assert_close(model(noisy, lengths), eager)


def test_classifier_arguments_are_checked():
    with pytest.raises(ValueError, match="pooling must be one of"):
        rnnext.SequenceClassifier("gru", 4, 4, 2, pooling="max")
    with pytest.raises(ValueError, match="cell must be one of"):
        rnnext.SequenceClassifier("transformer", 4, 4, 2)
    with pytest.raises(ValueError, match="lengths must be 1-D of size B = 4"):
        pooling.mean_pool(torch.randn(5, 4, 3), torch.tensor([1, 2]))
