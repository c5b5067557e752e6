"""torch.func over rnnext's modules. vmap (torch.nn's RNNs have no vmap rule): the results of
a vmapped call equal those of a loop over the samples, for outputs, states and gradients;
samples that share the weights run as one call. grad: the fused backward where nothing
differentiates its results again, the differentiable one where something does."""

from __future__ import annotations

import pytest
import torch
from conftest import MODES, make_module

from rnnext import _autograd
from rnnext._vmap import OPS_HAVE_VMAP_RULES

N = 3  # samples mapped over


def flat(result):
    """(output, h_n[, c_n]) of a module call as one tuple."""
    output, hidden = result
    return (output, *(hidden if isinstance(hidden, tuple) else (hidden,)))


def assert_all_close(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def per_sample(fn, *samples):
    """fn over each sample, stacked: what vmap must give."""
    results = [fn(*args) for args in zip(*samples)]
    return tuple(torch.stack(values) for values in zip(*results))


CONFIGS = {
    "one_layer": ({}, False),
    "two_layers_bidirectional_batch_first": (
        dict(num_layers=2, bidirectional=True, batch_first=True),
        False,
    ),
    "lengths": (dict(bidirectional=True), True),
    "checkpointed_lengths": (dict(checkpoint_every=2), True),
    "projection": (dict(proj_size=2), False),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mode", MODES)
def test_vmap_equals_a_loop_over_samples(mode, config, device):
    kwargs, with_lengths = CONFIGS[config]
    if "proj_size" in kwargs and mode != "LSTM":
        pytest.skip("proj_size is an LSTM's")
    torch.manual_seed(0)
    module = make_module(mode, 3, 4, nn=False, **kwargs).to(device, torch.float64)
    xs = torch.randn(N, 5, 3, 3, dtype=torch.float64, device=device)  # N samples of [T, B, I]
    lengths = torch.tensor([5, 2, 4]) if with_lengths else None

    def call(x):
        return flat(module(x, lengths=lengths))

    with torch.no_grad():  # the op's own vmap rule
        assert_all_close(torch.func.vmap(call)(xs), per_sample(call, xs))
    # with gradients on (the autograd Function's rule), and gradients of a loss over all
    # samples' results, which sums the weight gradients over the samples
    xs.requires_grad_()
    params = [xs, *module.parameters()]
    got = torch.func.vmap(call)(xs)
    expected = per_sample(call, xs)
    assert_all_close(got, expected)
    weights = [torch.randn_like(t) for t in got]
    loss = sum((t * w).sum() for t, w in zip(got, weights))
    expected_loss = sum((t * w).sum() for t, w in zip(expected, weights))
    assert_all_close(torch.autograd.grad(loss, params), torch.autograd.grad(expected_loss, params))


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_vmap_over_initial_states(mode, device):
    """Each sample with its own initial state, the input shared."""
    torch.manual_seed(0)
    module = make_module(mode, 3, 4, nn=False).to(device, torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=device)
    h0s = torch.randn(N, 1, 2, 4, dtype=torch.float64, device=device)

    def call(h0):
        hx = (h0, torch.zeros_like(h0)) if mode == "LSTM" else h0
        return flat(module(x, hx))

    assert_all_close(torch.func.vmap(call)(h0s), per_sample(call, h0s))


@pytest.mark.skipif(not OPS_HAVE_VMAP_RULES, reason="torch 2.4: no vmap rules for ops")
def test_samples_with_shared_weights_run_as_one_call(monkeypatch):
    """vmap over samples that share the weights calls each layer once, on all their rows."""
    calls = []
    forward = _autograd.LayerFunction.forward

    def counting(*args):
        calls.append(args[5].shape)  # the input
        return forward(*args)

    monkeypatch.setattr(_autograd.LayerFunction, "forward", staticmethod(counting))
    module = make_module("GRU", 3, 4, nn=False, num_layers=2)
    xs = torch.randn(N, 5, 2, 3, requires_grad=True)
    torch.func.vmap(lambda x: module(x)[0])(xs)
    assert calls == [(5, 2 * N, 3), (5, 2 * N, 4)]


def test_vmap_over_an_ensemble_of_weights(device):
    """Models stacked with torch.func.stack_module_state, each run on its own input."""
    torch.manual_seed(0)
    models = [make_module("LSTM", 3, 4, nn=False).to(device) for _ in range(N)]
    params, buffers = torch.func.stack_module_state(models)
    xs = torch.randn(N, 5, 2, 3, device=device)

    def call(p, b, x):
        return flat(torch.func.functional_call(models[0], (p, b), (x,)))

    expected = tuple(
        torch.stack(values) for values in zip(*(flat(m(x)) for m, x in zip(models, xs)))
    )
    assert_all_close(torch.func.vmap(call)(params, buffers, xs), expected)


@pytest.mark.parametrize("mode", MODES)
def test_per_sample_gradients(mode, device):
    """vmap(grad(loss)): each sample's own weight gradients, as a loop of grad gives them."""
    torch.manual_seed(0)
    module = make_module(mode, 3, 4, nn=False).to(device, torch.float64)
    params = {k: v.detach() for k, v in module.named_parameters()}
    xs = torch.randn(N, 5, 3, dtype=torch.float64, device=device)  # unbatched samples [T, I]
    targets = torch.randn(N, 4, dtype=torch.float64, device=device)

    def loss(p, x, target):
        output, _ = torch.func.functional_call(module, p, (x,))
        return ((output[-1] - target) ** 2).sum()

    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, xs, targets)
    for k, (x, target) in enumerate(zip(xs, targets)):
        expected = torch.func.grad(loss)(params, x, target)
        for name in params:
            torch.testing.assert_close(got[name][k], expected[name])


@pytest.mark.parametrize("mode", MODES)
def test_per_sample_gradients_with_unsorted_lengths(mode, device):
    """vmap(grad(loss)) over batched samples sharing unsorted lengths (a tie and a zero): the
    forward folds the samples into one call, whose batch the op sorts, and each sample's
    backward runs on its own part of that call's workspace; a loop of grad agrees."""
    torch.manual_seed(1)
    module = make_module(mode, 3, 4, nn=False, bidirectional=True).to(device, torch.float64)
    params = {k: v.detach() for k, v in module.named_parameters()}
    xs = torch.randn(N, 5, 4, 3, dtype=torch.float64, device=device)  # samples [T, B, I]
    lengths = torch.tensor([3, 5, 0, 3])

    def loss(p, x):
        output, _ = torch.func.functional_call(module, p, (x,), {"lengths": lengths})
        return (output * torch.arange(output.numel(), device=device).view_as(output)).sum()

    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    for k, x in enumerate(xs):
        expected = torch.func.grad(loss)(params, x)
        for name in params:
            torch.testing.assert_close(got[name][k], expected[name])


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_jacrev_equals_autograd_jacobian(frozen, device):
    """torch.func.jacrev maps a vjp function over the output's basis with vmap: the fused
    backward runs under vmap there, whether the parameters require grad or not."""
    torch.manual_seed(0)
    module = make_module("GRU", 3, 4, nn=False).to(device, torch.float64)
    module.requires_grad_(not frozen)
    x = torch.randn(4, 1, 3, dtype=torch.float64, device=device)

    def output(x):
        return module(x)[0]

    expected = torch.autograd.functional.jacobian(output, x)
    torch.testing.assert_close(torch.func.jacrev(output)(x), expected)


def test_activation_checkpointing(device):
    """torch.utils.checkpoint (non-reentrant) around a module: its backward unpacks each saved
    tensor once, as the checkpoint requires, and gives the plain call's gradients."""
    torch.manual_seed(0)
    module = make_module("LSTM", 3, 4, nn=False, num_layers=2).to(device, torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    params = [x, *module.parameters()]
    expected = torch.autograd.grad(module(x)[0].pow(2).sum(), params)
    output = torch.utils.checkpoint.checkpoint(lambda x: module(x)[0], x, use_reentrant=False)
    assert_all_close(torch.autograd.grad(output.pow(2).sum(), params), expected)


def grad_of_loss(module, params, x):
    def loss(p):
        return torch.func.functional_call(module, p, (x,))[0].pow(2).sum()

    return torch.func.grad(loss)(params)


@pytest.mark.parametrize("checkpoint_every", [None, 2], ids=["plain", "checkpointed"])
def test_func_grad_runs_the_fused_backward(checkpoint_every, monkeypatch, device):
    """torch.func.grad differentiates with create_graph=True; with nothing to differentiate
    its result again, the fused backward runs (not the reference's recomputation) and gives
    autograd's gradients."""
    torch.manual_seed(0)
    module = make_module("LSTM", 3, 4, nn=False, checkpoint_every=checkpoint_every)
    module = module.to(device, torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=device)
    loss = module(x)[0].pow(2).sum()
    expected = torch.autograd.grad(loss, list(module.parameters()))

    def no_reference(*args):
        raise AssertionError("the reference's recomputation ran")

    monkeypatch.setattr(_autograd, "_reference_backward", no_reference)
    got = grad_of_loss(module, {k: v.detach() for k, v in module.named_parameters()}, x)
    assert_all_close(tuple(got.values()), expected)


def test_func_grad_stays_differentiable_where_differentiated_again(device):
    """A second grad transform, or autograd outside torch.func over parameters that require
    grad (the second-order step of MAML, say), differentiates grad's result again: both
    give the same second derivatives."""
    torch.manual_seed(0)
    module = make_module("GRU", 3, 4, nn=False).to(device, torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=device)
    params = dict(module.named_parameters())

    def total(grads):
        return sum((g * g).sum() for g in grads.values())

    outer = torch.autograd.grad(total(grad_of_loss(module, params, x)), list(params.values()))
    detached = {k: v.detach() for k, v in params.items()}
    nested = torch.func.grad(lambda p: total(grad_of_loss(module, p, x)))(detached)
    assert any(g.abs().max() > 0 for g in outer)
    assert_all_close(tuple(nested.values()), outer)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.func's jit.script
def test_hessians(device):
    """Second derivatives through torch.func: torch.func.hessian (forward mode over reverse,
    the reference's ops) and jacrev of grad give autograd's Hessian; jacrev of jacrev raises
    an error that says what to use."""
    torch.manual_seed(0)
    module = make_module("LSTM", 2, 3, nn=False).to(device, torch.float64)
    x = torch.randn(4, 1, 2, dtype=torch.float64, device=device)

    def loss(x):
        return module(x)[0].pow(2).sum()

    expected = torch.autograd.functional.hessian(loss, x)
    assert expected.abs().max() > 0
    torch.testing.assert_close(torch.func.hessian(loss)(x), expected)
    torch.testing.assert_close(torch.func.jacrev(torch.func.grad(loss))(x), expected)
    if OPS_HAVE_VMAP_RULES:
        with pytest.raises(NotImplementedError, match=r"for a Hessian use torch.func.hessian"):
            torch.func.jacrev(torch.func.jacrev(loss))(x)
    else:  # torch 2.4: the layer runs as rnnext.reference's plain ops under torch.func
        torch.testing.assert_close(torch.func.jacrev(torch.func.jacrev(loss))(x), expected)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.func's jit.script
def test_forward_mode(device):
    """Forward-mode AD, torch.func.jvp and torch.autograd.forward_ad, gives autograd's
    Jacobian-vector product, also with respect to a weight."""
    torch.manual_seed(0)
    module = make_module("GRU", 3, 4, nn=False, bidirectional=True).to(device, torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=device)
    v = torch.randn_like(x)
    lengths = torch.tensor([5, 3])

    def output(x):
        return module(x, lengths=lengths)[0]

    jacobian = torch.autograd.functional.jacobian(output, x)
    expected = (jacobian.flatten(3) @ v.flatten()).reshape(jacobian.shape[:3])
    torch.testing.assert_close(torch.func.jvp(output, (x,), (v,))[1], expected)
    forward_ad = torch.autograd.forward_ad
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(output(forward_ad.make_dual(x, v))).tangent
    torch.testing.assert_close(tangent, expected)

    weight = module.weight_hh_l0
    direction = torch.randn_like(weight)

    def by_weight(w):
        return torch.func.functional_call(module, {"weight_hh_l0": w}, (x,))[0]

    jacobian = torch.autograd.functional.jacobian(by_weight, weight.detach())
    expected = (jacobian.flatten(3) @ direction.flatten()).reshape(jacobian.shape[:3])
    got = torch.func.jvp(by_weight, (weight.detach(),), (direction,))[1]
    torch.testing.assert_close(got, expected)
