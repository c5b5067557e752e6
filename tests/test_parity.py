"""Drop-in parity with torch.nn: every constructor option and input form, convert(), the
conveniences, and a word-language-model training loop."""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from conftest import assert_same, flat, make_module, module_pair, run_module, weighted_loss

import rnnext

CELLS = ["RNN_TANH", "GRU", "LSTM"]


def options(mode):
    """Every combination the issue lists; proj_size only exists for LSTM."""
    projections = [0, 3] if mode == "LSTM" else [0]
    return itertools.product([1, 2, 3], [False, True], [False, True], [True, False], projections)


def make_hx(mode, layers, directions, batch, out_size, hidden, batched):
    def state(size):
        shape = (layers * directions, batch, size) if batched else (layers * directions, size)
        return torch.randn(shape, dtype=torch.float64, requires_grad=True)

    return (state(out_size), state(hidden)) if mode == "LSTM" else state(out_size)


@pytest.mark.parametrize("mode", CELLS)
@pytest.mark.parametrize("form", ["batched", "unbatched", "packed"])
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "nohx"])
def test_every_option_matches_torch_nn(mode, form, with_hx):
    T, B, I, H = 5, 4, 3, 5
    for layers, bidirectional, batch_first, bias, proj in options(mode):
        torch.manual_seed(layers * 16 + bidirectional * 8 + batch_first * 4 + bias * 2 + proj)
        kwargs = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        kwargs.update(bias=bias, **(dict(proj_size=proj) if proj else {}))
        theirs, ours = module_pair(mode, I, H, **kwargs)
        batched = form != "unbatched"
        shape = ((B, T, I) if batch_first else (T, B, I)) if batched else (T, I)
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        D = 2 if bidirectional else 1
        hx = make_hx(mode, layers, D, B, proj or H, H, batched) if with_hx else None
        lengths = torch.tensor([3, 5, 1, 4]) if form == "packed" else None
        assert_same(theirs, ours, x, hx, packed_lengths=lengths)


@pytest.mark.parametrize("mode", ["RNN_RELU", "GRU", "LSTM"])
def test_float32_sample(mode):
    torch.manual_seed(5)
    kwargs = dict(num_layers=2, bidirectional=True, batch_first=True)
    kwargs.update(dict(proj_size=6) if mode == "LSTM" else {})
    theirs, ours = module_pair(mode, 8, 12, dtype=torch.float32, **kwargs)
    x = torch.randn(4, 9, 8, requires_grad=True)
    lengths = torch.tensor([9, 2, 7, 5])
    assert_same(theirs, ours, x, None, packed_lengths=lengths, rtol=1e-4, atol=1e-5)
    assert_same(theirs, ours, x, None, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", CELLS)
def test_dropout_between_layers_only(mode):
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    theirs, ours = module_pair(mode, 4, 5, num_layers=3, dropout=0.5)
    # evaluation: no dropout at all, same as torch.nn
    theirs.eval(), ours.eval()
    torch.testing.assert_close(flat(ours(x)), flat(theirs(x)))
    # training: torch.nn drops between layers; with the same seed, the very same elements
    theirs.train(), ours.train()
    torch.manual_seed(11)
    expected = flat(theirs(x))
    torch.manual_seed(11)
    got = flat(ours(x))
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got[0], flat(ours.eval()(x))[0])
    # one layer: nothing to drop between, training equals evaluation
    with pytest.warns(UserWarning, match="dropout"):
        single = make_module(mode, 4, 5, nn=False, dropout=0.5).double()
    torch.testing.assert_close(flat(single.train()(x)), flat(single.eval()(x)))


@pytest.mark.parametrize("order", ["unsorted", "sorted", "ties"])
@pytest.mark.parametrize("mode", CELLS)
def test_lengths_keyword_matches_packed(mode, order):
    """lengths= gives torch.nn's PackedSequence results and gradients, whatever the order of
    the lengths (ties included), and reorders nothing in Python: the op does."""
    torch.manual_seed(6)
    theirs, ours = module_pair(mode, 3, 4, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(5, 7, 3, dtype=torch.float64, requires_grad=True)
    lengths = {
        "unsorted": torch.tensor([7, 3, 1, 5, 6]),
        "sorted": torch.tensor([7, 6, 5, 3, 1]),
        "ties": torch.tensor([7, 5, 5, 1, 1]),
    }[order]
    expected, expected_grads = run_module(theirs, x, None, packed_lengths=lengths)
    got = flat(ours(x, lengths=lengths))
    nodes, pending = set(), [t.grad_fn for t in got]
    while pending:
        node = pending.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            pending += [f for f, _ in node.next_functions]
    names = sorted({type(node).__name__ for node in nodes})
    assert not any("Permutation" in name or "IndexSelect" in name for name in names), names
    got += [] if mode == "LSTM" else [got[0].new_zeros(0)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    names, params = zip(*ours.named_parameters())
    grads = torch.autograd.grad(weighted_loss(*got), (x, *params))
    for name, grad in zip(("input", *names), grads):
        torch.testing.assert_close(grad, expected_grads[name])


@pytest.mark.parametrize("grad_kind", ["dense", "expanded"])
@pytest.mark.parametrize("reordering", ["batch", "time"])
def test_reordering_gradient(reordering, grad_kind):
    """The reorderings around the kernels (of the batch by length; of each sequence in time,
    for a checkpointed reverse direction) send the gradient back through the inverse
    permutation: index_select's and gather's own gradients, and a gradient that is one value
    along the reordered dimension (from output.sum()) comes back still expanded, not copied
    out."""
    torch.manual_seed(7)
    x = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    functional = rnnext.functional
    if reordering == "batch":
        order, dim = torch.tensor([3, 0, 4, 1, 2]), 1

        def reorder(t):
            return functional.select_batch([t], order, torch.argsort(order))[0]

        def plain(t):
            return t.index_select(1, order)
    else:
        lengths, dim = torch.tensor([4, 2, 0, 3, 1]), 0
        steps = torch.arange(4)[:, None]
        source = torch.where(steps < lengths, lengths - 1 - steps, steps)

        def reorder(t):
            return functional.reverse_in_time(t, lengths)

        def plain(t):
            return t.gather(0, source[:, :, None].expand(t.shape))

    y = reorder(x)
    torch.testing.assert_close(y, plain(x), rtol=0, atol=0)
    grad = torch.randn(4, 5, 3, dtype=torch.float64)
    if grad_kind == "expanded":
        grad = grad.narrow(dim, 0, 1).expand(4, 5, 3)
    (got,) = torch.autograd.grad(y, x, grad)
    (expected,) = torch.autograd.grad(plain(x), x, grad)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if grad_kind == "expanded":
        assert got.stride(dim) == 0
    assert torch.autograd.gradcheck(reorder, (x,))


class RecurrentStack(torch.nn.Module):
    """A model with several recurrent layers of each kind, picklable for torch.save."""

    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True)
        self.stack = torch.nn.Sequential(torch.nn.Linear(12, 5))
        self.gru = torch.nn.GRU(5, 7, batch_first=False)
        self.rnn = torch.nn.RNN(7, 3, nonlinearity="relu")

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.gru(self.stack(y))
        return self.rnn(y)[0]


def model_with_recurrent_layers():
    return RecurrentStack().double()


def test_convert_shares_parameters_and_keeps_optimiser():
    torch.manual_seed(7)
    reference = model_with_recurrent_layers()
    model = copy.deepcopy(reference)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_optimiser = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    params_before = list(model.parameters())
    assert rnnext.convert(model) is model
    assert type(model.lstm) is rnnext.LSTM and type(model.gru) is rnnext.GRU
    assert type(model.rnn) is rnnext.RNN and model.rnn.nonlinearity == "relu"
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    for _ in range(2):  # before and after an optimiser step
        for m, opt in ((model, optimiser), (reference, ref_optimiser)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
        for a, b in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(a.grad, b.grad)
        optimiser.step()
        ref_optimiser.step()
        torch.testing.assert_close(model(x), reference(x))
    rnnext.revert(model)
    assert type(model.lstm) is torch.nn.LSTM and type(model.rnn) is torch.nn.RNN
    torch.testing.assert_close(model(x), reference(x))


def test_conveniences():
    model = rnnext.convert(model_with_recurrent_layers())
    torch.nn.LSTM(4, 6).flatten_parameters()
    model.lstm.flatten_parameters()
    assert repr(model.lstm) == repr(torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    assert type(loaded.lstm) is rnnext.LSTM
    torch.testing.assert_close(loaded(x), model(x))
    model.float()
    assert model.lstm.weight_ih_l0.dtype == torch.float32
    assert model(x.float()).dtype == torch.float32
    model.to(torch.float64)
    torch.testing.assert_close(model(x), loaded(x))


def word_language_model(impl, vocab=40, emb=16, hidden=24, layers=2, dropout=0.3):
    """The shape of PyTorch's word_language_model example: embedding, LSTM, linear decoder."""

    class RNNModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(dropout)
            self.encoder = torch.nn.Embedding(vocab, emb)
            self.rnn = impl.LSTM(emb, hidden, layers, dropout=dropout)
            self.decoder = torch.nn.Linear(hidden, vocab)

        def forward(self, tokens, hidden_state):
            emb = self.drop(self.encoder(tokens))
            output, hidden_state = self.rnn(emb, hidden_state)
            return self.decoder(self.drop(output)), hidden_state

    return RNNModel()


def train_losses(impl, dtype, steps=20, bptt=8, batch=4, lr=5.0):
    torch.manual_seed(0)
    model = word_language_model(impl).to(dtype)
    data = torch.randint(
        0, 40, (steps * bptt + 1, batch), generator=torch.Generator().manual_seed(1)
    )
    hidden = None
    losses = []
    for step in range(steps):
        source = data[step * bptt : (step + 1) * bptt]
        target = data[step * bptt + 1 : (step + 1) * bptt + 1]
        if hidden is not None:  # truncated BPTT: carry the state, cut its history
            hidden = tuple(h.detach() for h in hidden)
        model.zero_grad()
        output, hidden = model(source, hidden)
        loss = torch.nn.functional.cross_entropy(output.view(-1, 40), target.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-lr)
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


def test_word_language_model_training_matches():
    # float64: both follow the same trajectory up to rounding
    torch.testing.assert_close(
        train_losses(rnnext, torch.float64),
        train_losses(torch.nn, torch.float64),
        rtol=1e-9,
        atol=1e-9,
    )
    # float32: the gap to torch.nn stays within a few times torch.nn's own float32 error,
    # measured against its float64 run of the same loop (rounding grows over 20 steps), with a
    # floor of a few float32 ulps of the loss for the case that torch.nn happens to be exact
    exact = train_losses(torch.nn, torch.float64)
    ours, theirs = train_losses(rnnext, torch.float32), train_losses(torch.nn, torch.float32)
    float32_error = (theirs - exact).abs().max().item()
    ulps = 8 * torch.finfo(torch.float32).eps * exact.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 4 * float32_error + ulps
