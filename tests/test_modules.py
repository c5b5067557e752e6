"""rnnext.RNN, GRU and LSTM against torch.nn with the same weights."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import MODES, assert_same, flat, make_module, module_pair, run_module

# (T, B, I, H): T=1, B=1, H=1, I != H.
SHAPES = [(1, 1, 1, 1), (1, 3, 4, 2), (7, 1, 3, 5), (6, 4, 8, 8), (4, 2, 2, 9)]


def states(mode, B, H, dtype, device, batched=True):
    shape = (1, B, H) if batched else (1, H)
    h0 = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    if mode != "LSTM":
        return h0
    return h0, torch.randn(shape, dtype=dtype, device=device, requires_grad=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_state", [True, False], ids=["hx", "nohx"])
def test_matches_torch_nn(mode, shape, bias, with_state, device):
    torch.manual_seed(0)
    T, B, I, H = shape
    theirs, ours = module_pair(mode, I, H, device=device, bias=bias)
    x = torch.randn(T, B, I, dtype=torch.float64, device=device, requires_grad=True)
    hx = states(mode, B, H, torch.float64, device) if with_state else None
    assert_same(theirs, ours, x, hx)


@pytest.mark.parametrize("mode", MODES)
def test_batch_first_and_unbatched(mode, device):
    torch.manual_seed(1)
    theirs, ours = module_pair(mode, 3, 4, device=device, batch_first=True)
    x = torch.randn(2, 5, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert_same(theirs, ours, x, states(mode, 2, 4, torch.float64, device))
    for batch_first in (False, True):
        theirs, ours = module_pair(mode, 3, 4, device=device, batch_first=batch_first)
        x = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
        assert_same(theirs, ours, x, None)
        assert_same(theirs, ours, x, states(mode, 1, 4, torch.float64, device, batched=False))


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_input(mode, device):
    theirs, ours = module_pair(mode, 3, 4, device=device)
    x = torch.randn(2, 6, 6, dtype=torch.float64, device=device).transpose(0, 1)[:, :, ::2]
    assert not x.is_contiguous()
    assert_same(theirs, ours, x.requires_grad_(), None)


@pytest.mark.parametrize("mode", MODES)
def test_float32_error_within_torch_nn_scale(mode, device):
    """In float32 our error against a float64 run stays within a small multiple of torch.nn's."""
    torch.manual_seed(3)
    T, B, I, H = 50, 8, 32, 64
    theirs64, ours64 = module_pair(mode, I, H, device=device)
    x64 = torch.randn(T, B, I, dtype=torch.float64, device=device, requires_grad=True)
    exact, exact_grads = run_module(theirs64, x64, None)
    theirs32, ours32 = theirs64.float(), ours64.float()
    x32 = x64.detach().float().requires_grad_()
    (nn_out, nn_grads), (our_out, our_grads) = (
        run_module(m, x32, None) for m in (theirs32, ours32)
    )
    pairs = list(zip(nn_out, our_out, exact)) + [
        (nn_grads[k], our_grads[k], exact_grads[k]) for k in exact_grads
    ]
    for nn_value, our_value, exact_value in pairs:
        scale = exact_value.abs().max().item() if exact_value.numel() else 0.0
        nn_err = (nn_value.double() - exact_value).abs().max().item() if scale else 0.0
        our_err = (our_value.double() - exact_value).abs().max().item() if scale else 0.0
        # a floor of a few float32 ulps of the value's scale keeps an exact torch.nn from
        # making the bound zero
        assert our_err <= 4 * nn_err + 8 * torch.finfo(torch.float32).eps * scale


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_both_ways(mode):
    torch.manual_seed(4)
    theirs = make_module(mode, 5, 7, nn=True)
    torch.manual_seed(4)
    ours = make_module(mode, 5, 7, nn=False)
    # same constructor, same initialisation, same names and shapes
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)
    torch.manual_seed(5)
    ours.reset_parameters()
    back = make_module(mode, 5, 7, nn=True)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(4, 2, 5)
    torch.testing.assert_close(flat(back(x)), flat(ours(x)))


@pytest.mark.parametrize("mode", MODES)
def test_is_an_rnnbase_and_pickles(mode):
    ours = make_module(mode, 3, 4, nn=False, batch_first=True)
    assert isinstance(ours, torch.nn.RNNBase)
    assert repr(ours).startswith(type(ours).__name__ + "(3, 4")
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(ours)
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(flat(loaded(x)), flat(ours(x)))


@pytest.mark.parametrize("every", [None, 2], ids=["whole", "checkpointed"])
@pytest.mark.parametrize("mode", MODES)
def test_torch_func_grad(mode, every):
    """Under a functorch transform the layer goes through torch's own Function.apply (the
    plain call skips its argument binding): torch.func.grad gives autograd's gradient."""
    torch.manual_seed(0)
    ours = make_module(mode, 3, 4, nn=False, checkpoint_every=every).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    through_func = torch.func.grad(lambda x: ours(x)[0].sum())(x)
    leaf = x.clone().requires_grad_()
    ours(leaf)[0].sum().backward()
    torch.testing.assert_close(through_func, leaf.grad)


class _Scale(torch.nn.Module):
    def forward(self, weight):
        return 0.5 * weight


@pytest.mark.parametrize("how", ["new_parameter", "parametrization", "plain_tensor"])
@pytest.mark.parametrize("mode", MODES)
def test_replaced_weights_are_used(mode, how):
    """A weight replaced after the first call (a new Parameter, a parametrization, a plain
    tensor as torch.func.functional_call leaves) is what the next call runs on, as in torch.nn,
    whose check of the weights the modules shorten for the usual case of none replaced."""
    torch.manual_seed(3)
    theirs, ours = module_pair(mode, 3, 4)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    first = flat(ours(x))
    torch.testing.assert_close(first, flat(theirs(x)))
    replacement = torch.randn_like(theirs.weight_hh_l0)
    for module in (theirs, ours):
        if how == "new_parameter":
            module.weight_hh_l0 = torch.nn.Parameter(replacement.clone())
        elif how == "parametrization":
            torch.nn.utils.parametrize.register_parametrization(module, "weight_hh_l0", _Scale())
        else:
            del module.weight_hh_l0
            module.weight_hh_l0 = replacement.clone()
    got, expected = flat(ours(x)), flat(theirs(x))
    torch.testing.assert_close(got, expected)
    if how != "parametrization":  # (a parametrized weight changes at each call)
        assert ours._flat_weights[1] is ours.weight_hh_l0
    assert not torch.allclose(got[0], first[0])  # the replacement changed the results
