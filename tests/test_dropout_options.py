"""rnnext's dropout options beyond torch.nn's: weight_dropout (DropConnect on the
hidden-to-hidden weights) and variational_dropout (one mask per sequence between layers)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import MODES, flat, make_module, weighted_loss
from torch.func import functional_call

import rnnext
from rnnext.modules import drop_connect

# (mode, layers, bidirectional, proj_size): where each direction's W_hh sits in the flat
# weights
LAYOUTS = [(mode, 1, False, 0) for mode in MODES] + [(mode, 2, True, 0) for mode in MODES]
LAYOUTS += [("LSTM", 2, False, 3), ("LSTM", 1, True, 2)]


def keep_masks(module, p):
    """Each W_hh's mask of kept elements, in flat-weight order (layer by layer, forward
    direction first): uniform draws of at least p."""
    return {
        name: torch.rand(weight.shape, device=weight.device) >= p
        for name, weight in module.named_parameters()
        if name.startswith("weight_hh")
    }


def expected_run(module, x, seed, p):
    """torch.nn's own forward on the module's weights with each W_hh masked and scaled by
    1 / (1 - p), the masks drawn from the same seed."""
    torch.manual_seed(seed)
    params = dict(module.named_parameters())
    for name, keep in keep_masks(module, p).items():
        params[name] = params[name] * keep / (1 - p)
    return _torch_forward(type(module)._torch_class, module, params, x)


def _torch_forward(torch_class, module, params, x):
    original = module.__class__
    module.__class__ = torch_class  # torch.nn's forward on the same module object
    try:
        return functional_call(module, params, (x,))
    finally:
        module.__class__ = original


def _loss(results):
    return weighted_loss(*results, *([] if len(results) == 3 else [results[0][:0]]))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "-".join(map(str, layout)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_training_drops_w_hh_as_f_dropout(layout, bias, device):
    mode, layers, bidirectional, proj = layout
    torch.manual_seed(0)
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, bias=bias)
    kwargs.update(dict(proj_size=proj) if proj else {})
    module = make_module(mode, 3, 5, nn=False, weight_dropout=0.4, **kwargs)
    module = module.to(device, torch.float64)
    x = torch.randn(6, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    inputs = [x, *module.parameters()]

    torch.manual_seed(7)
    got = flat(module(x))
    got_grads = torch.autograd.grad(_loss(got), inputs)
    expected = flat(expected_run(module, x, 7, 0.4))
    expected_grads = torch.autograd.grad(_loss(expected), inputs)
    for a, b in zip(got + list(got_grads), expected + list(expected_grads)):
        torch.testing.assert_close(a, b)
    # the mask is not trivial, and the gradient of each W_hh is zero where it dropped
    torch.manual_seed(7)
    grads = dict(zip([n for n, _ in module.named_parameters()], got_grads[1:]))
    for name, kept in keep_masks(module, 0.4).items():
        assert 0 < kept.sum() < kept.numel(), name
        assert torch.all(grads[name][~kept] == 0), name

    # a new mask on every call
    assert not torch.equal(flat(module(x))[0], got[0])


@pytest.mark.parametrize("mode", MODES)
def test_evaluation_and_zero_leave_the_weights_alone(mode, device):
    torch.manual_seed(1)
    theirs = make_module(mode, 3, 4, nn=True, num_layers=2).to(device, torch.float64)
    ours = make_module(mode, 3, 4, nn=False, num_layers=2, weight_dropout=0.5)
    ours = ours.to(device, torch.float64)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=device)
    ours.eval()
    torch.testing.assert_close(flat(ours(x)), flat(theirs(x)))
    ours.train()
    ours.weight_dropout = 0.0  # an attribute, like checkpoint_every
    torch.testing.assert_close(flat(ours(x)), flat(theirs(x)))
    # a module converted from torch.nn has neither attribute, and trains without them
    theirs = make_module(mode, 3, 4, nn=True, num_layers=2, dropout=0.5)
    theirs = theirs.to(device, torch.float64).train()
    converted = rnnext.convert(copy.deepcopy(theirs))
    assert "_weight_dropout" not in converted.__dict__ and "dropout=0.5)" in repr(converted)
    assert converted.weight_dropout == 0.0 and converted.variational_dropout is False
    torch.manual_seed(3)
    expected = flat(theirs(x))
    torch.manual_seed(3)
    torch.testing.assert_close(flat(converted(x)), expected)
    assert "weight_dropout=0.5" in repr(make_module(mode, 3, 4, nn=False, weight_dropout=0.5))


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.5", None, True])
def test_bad_values(value):
    """Checked in the constructor and whenever set as an attribute, naming what came."""
    message = rf"rnnext.GRU: weight_dropout must be a number in \[0, 1\], got {value!r}"
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make_module("GRU", 3, 4, nn=False, weight_dropout=value)
    module = make_module("GRU", 3, 4, nn=False, weight_dropout=0.25)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        module.weight_dropout = value
    assert module.weight_dropout == 0.25
    if not isinstance(value, bool):
        message = f"rnnext.GRU: variational_dropout must be True or False, got {value!r}"
        with pytest.raises(TypeError, match=message):
            make_module("GRU", 3, 4, nn=False, variational_dropout=value)
        with pytest.raises(TypeError, match=message):
            module.variational_dropout = value
        assert module.variational_dropout is False
    # numbers of other types, as torch.nn's dropout takes them
    module.weight_dropout = np.float32(0.5)
    assert module.weight_dropout == 0.5 and type(module.weight_dropout) is float


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
def test_variational_dropout_keeps_one_mask_per_sequence(mode, batch_first, device):
    """A 3-layer module in training equals its layers run one by one as torch.nn modules with
    each inter-layer output multiplied by a [1, B, F] mask of F.dropout, drawn from the same
    seed: the same elements dropped at every time step."""
    torch.manual_seed(2)
    B, T, F = 3, 6, 4
    options = dict(num_layers=3, dropout=0.5, variational_dropout=True, batch_first=batch_first)
    ours = make_module(mode, 3, F, nn=False, **options).to(device, torch.float64).train()
    assert "variational_dropout=True" in repr(ours)
    x = torch.randn(T, B, 3, dtype=torch.float64, device=device, requires_grad=True)
    torch.manual_seed(9)
    got = flat(ours(x.transpose(0, 1) if batch_first else x))
    if batch_first:
        got[0] = got[0].transpose(0, 1)
    inputs = [x, *ours.parameters()]
    got_grads = torch.autograd.grad(_loss(got), inputs)

    layers = [make_module(mode, 3 if i == 0 else F, F, nn=True) for i in range(3)]
    params = dict(ours.named_parameters())
    output, states = x, []
    torch.manual_seed(9)
    for i, layer in enumerate(layers):
        layer = layer.to(device, torch.float64)
        suffix = f"_l{i}"
        own = {n[: -len(suffix)] + "_l0": p for n, p in params.items() if n.endswith(suffix)}
        output, h = functional_call(layer, own, (output,))
        states.append(h)
        if i < 2:
            keep = torch.nn.functional.dropout(output.new_ones(1, B, F), 0.5, training=True)
            assert 0 < keep.count_nonzero() < keep.numel()
            output = output * keep
    if mode == "LSTM":
        expected = [output, torch.cat([h for h, _ in states]), torch.cat([c for _, c in states])]
    else:
        expected = [output, torch.cat(states)]
    expected_grads = torch.autograd.grad(_loss(expected), inputs)
    for a, b in zip(got + list(got_grads), expected + list(expected_grads)):
        torch.testing.assert_close(a, b)

    # evaluation drops nothing: torch.nn's result
    theirs = make_module(mode, 3, F, nn=True, num_layers=3, dropout=0.5, batch_first=batch_first)
    theirs = theirs.to(device, torch.float64)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(flat(ours.eval()(x)), flat(theirs.eval()(x)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_weight_dropout_of_one_zeroes_w_hh(dtype):
    """p = 1 drops every element (no 0 * inf); the dropped weight keeps the weight's dtype."""
    torch.manual_seed(0)
    ours = make_module("LSTM", 3, 4, nn=False, weight_dropout=1.0).to(dtype)
    theirs = make_module("LSTM", 3, 4, nn=True).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        theirs.weight_hh_l0.zero_()
    x = torch.randn(5, 2, 3).to(dtype)
    got = flat(ours(x))
    assert all(t.dtype == dtype and t.isfinite().all() for t in got)
    # bfloat16: torch.nn rounds between its ops, rnnext computes in float32; the outputs and
    # states here lie in (-1, 1), where a bfloat16 rounding step is at most 2^-8
    assert all(t.abs().max() < 1 for t in got)
    tolerance = dict(atol=2**-8, rtol=0) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(got, flat(theirs(x)), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_drop_connect_draws_in_float32(dtype):
    """The mask of a half-precision weight comes from float32 draws (bfloat16 draws take 256
    values), and the kept elements are the weight times 1 / (1 - p), rounded once."""
    weight = torch.randn(400, 250).to(dtype)
    torch.manual_seed(5)
    dropped = drop_connect(weight, 0.001)
    torch.manual_seed(5)
    keep = torch.rand(weight.shape) >= 0.001
    assert dropped.dtype == dtype
    expected = (weight.float() * keep * (1 / 0.999)).to(dtype)
    torch.testing.assert_close(dropped, expected, rtol=0, atol=0)
    # 100 of 100000 expected; a bfloat16 draw's rounding would drop three times as many
    assert 50 < (~keep).sum() < 150


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_dropout_options_with_lengths_packed_and_checkpoints(mode, device):
    """From the same seed, lengths, a PackedSequence and checkpoint_every draw the same masks
    and give the same results as each other. (The lengths are sorted: a PackedSequence runs
    its batch sorted longest first, so with unsorted lengths its per-sequence masks would fall
    to other sequences than with ``lengths=``, equally random but not equal.)"""
    torch.manual_seed(0)
    options = dict(num_layers=2, dropout=0.5, weight_dropout=0.3, variational_dropout=True)
    module = make_module(mode, 3, 4, nn=False, **options).to(device, torch.float64)
    x = torch.randn(6, 3, 3, dtype=torch.float64, device=device)
    lengths = torch.tensor([6, 4, 2])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)

    def run(**kwargs):
        torch.manual_seed(8)
        if "packed" in kwargs:
            output, hidden = module(packed)
            output = torch.nn.utils.rnn.pad_packed_sequence(output, total_length=6)[0]
            return flat((output, hidden))
        return flat(module(x, lengths=lengths))

    expected = run()
    torch.testing.assert_close(run(packed=True), expected)
    module.checkpoint_every = 2
    torch.testing.assert_close(run(), expected)
    torch.manual_seed(9)
    assert not torch.equal(flat(module(x, lengths=lengths))[0], expected[0])


def test_revert_warns_of_options_torch_nn_lacks():
    model = torch.nn.Sequential(
        rnnext.GRU(3, 4, weight_dropout=0.2), rnnext.LSTM(4, 4, checkpoint_every=2)
    )
    with pytest.warns(UserWarning) as record:
        rnnext.revert(model)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "torch.nn has no weight_dropout=0.2; torch.nn's forward of 0 will not" in messages[0]
    assert "no checkpoint_every=2; torch.nn's forward of 1" in messages[1]
    assert type(model[0]) is torch.nn.GRU
    assert rnnext.convert(model)[0].weight_dropout == 0.2  # kept for a later convert
    # a plain module reverts without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnnext.revert(rnnext.convert(torch.nn.LSTM(3, 4)))
