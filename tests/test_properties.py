"""Property tests: random shapes and options, the fused layer against the reference and whole
modules against torch.nn."""

from __future__ import annotations

import torch
from conftest import MODES, layer_weights, module_pair, weighted_loss
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnext import functional, reference


@st.composite
def layer_cases(draw):
    mode = draw(st.sampled_from(MODES))
    T, B = draw(st.integers(1, 6)), draw(st.integers(0, 5))
    I, H = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    proj = draw(st.integers(0, 4)) if mode == "LSTM" else 0
    lengths = draw(st.none() | st.lists(st.integers(0, T), min_size=B, max_size=B))
    return dict(
        mode=mode,
        T=T,
        B=B,
        I=I,
        H=H,
        proj=proj,
        bias=draw(st.booleans()),
        bidirectional=draw(st.booleans()),
        with_state=draw(st.booleans()),
        lengths=lengths,
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=150, deadline=None, derandomize=True)
@given(layer_cases())
def test_random_layers_match_reference(case):
    torch.manual_seed(case["seed"])
    mode, T, B, I, H, proj = (case[k] for k in ("mode", "T", "B", "I", "H", "proj"))
    D = 2 if case["bidirectional"] else 1
    opts = dict(dtype=torch.float64)
    x = torch.randn(T, B, I, **opts, requires_grad=True)
    weights = layer_weights(mode, I, H, bias=case["bias"], directions=D, proj=proj)
    h0 = c0 = None
    if case["with_state"]:
        h0 = torch.randn(D, B, proj or H, **opts, requires_grad=True)
        c0 = torch.randn(D, B, H, **opts, requires_grad=True) if mode == "LSTM" else None
    lengths = torch.tensor(case["lengths"], dtype=torch.int64) if case["lengths"] else None
    if lengths is not None and lengths.numel() != B:
        lengths = None
    inputs = [t for t in (x, h0, c0, *weights) if t is not None]
    results = []
    for impl in (functional, reference):
        out = impl.recurrent_layer(
            mode,
            x,
            weights,
            h0,
            c0,
            has_biases=case["bias"],
            bidirectional=case["bidirectional"],
            lengths=lengths,
        )
        grads = torch.autograd.grad(weighted_loss(*out), inputs, allow_unused=True)
        results.append(list(out) + [g if g is not None else torch.zeros(0) for g in grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@st.composite
def module_cases(draw):
    mode = draw(st.sampled_from(MODES))
    T, B = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    bidirectional = draw(st.booleans())
    return dict(
        mode=mode,
        T=T,
        B=B,
        I=draw(st.integers(1, 5)),
        H=draw(st.integers(2, 5)),
        layers=draw(st.integers(1, 3)),
        bidirectional=bidirectional,
        batch_first=draw(st.booleans()),
        bias=draw(st.booleans()),
        proj=draw(st.integers(0, 1)) if mode == "LSTM" else 0,
        lengths=draw(st.none() | st.lists(st.integers(1, T), min_size=B, max_size=B)),
        checkpoint_every=draw(st.none() | st.integers(1, 3)),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=40, deadline=None, derandomize=True)
@given(module_cases())
def test_random_modules_match_torch_nn(case):
    """Whole modules (layers, directions, batch_first, bias, projection, checkpointing) with
    ``lengths=`` against torch.nn on the equivalent PackedSequence."""
    torch.manual_seed(case["seed"])
    kwargs = dict(
        num_layers=case["layers"],
        bidirectional=case["bidirectional"],
        batch_first=case["batch_first"],
        bias=case["bias"],
    )
    if case["proj"]:
        kwargs["proj_size"] = case["proj"]
    theirs, ours = module_pair(case["mode"], case["I"], case["H"], **kwargs)
    ours.checkpoint_every = case["checkpoint_every"]
    T, B = case["T"], case["B"]
    shape = (B, T, case["I"]) if case["batch_first"] else (T, B, case["I"])
    x = torch.randn(shape, dtype=torch.float64)
    lengths = torch.tensor(case["lengths"]) if case["lengths"] else None
    results = []
    for module in (theirs, ours):
        leaf = x.clone().requires_grad_()
        if lengths is None:
            output, state = module(leaf)
        elif module is ours:
            output, state = module(leaf, lengths=lengths)
        else:
            packed = pack_padded_sequence(leaf, lengths, case["batch_first"], False)
            output, state = module(packed)
            output = pad_packed_sequence(output, case["batch_first"], total_length=T)[0]
        states = list(state) if isinstance(state, tuple) else [state]
        loss = weighted_loss(output, states[0], states[1] if len(states) > 1 else output[:0])
        grads = torch.autograd.grad(loss, [leaf, *module.parameters()])
        results.append([output, *states, *grads])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want)
