"""bfloat16 layers on the CPU: the products with the weights in bfloat16 (bf16_products).

Where the CPU has AVX512-BF16, the ops' bf16_products rounds the operands of the products
with a weight and of the weight gradients to bfloat16 and sums in float32 (narrow products and
the h0 term of W_hh's gradient aside); the reference does the same rounding in float64
(reference.recurrent_layer(bf16_products=True)). Elsewhere, or with RNNEXT_CPU_BF16_PRODUCTS=0,
the flag must change nothing.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MODES, layer_weights, make_module, weighted_loss

from rnnext import functional, reference
from rnnext._autograd import LayerFunction

HAS_BF16_DOT = functional.cpu_bf16_products()
needs_bf16_dot = pytest.mark.skipif(not HAS_BF16_DOT, reason="the CPU has no AVX512-BF16")


def bf16_values(t: torch.Tensor) -> torch.Tensor:
    """t's values rounded to bfloat16, in float64."""
    return t.detach().to(torch.bfloat16).double()


def layer_output(
    mode, x, weights, bidirectional, lengths, bf16_products, *, bias=True, hx=None, cx=None
):
    """(output, h_n, c_n) of the op (float32) through its autograd Function."""
    output, h_n, c_n, _ = LayerFunction.apply(
        mode, bias, bidirectional, bf16_products, lengths, x, hx, cx, *weights
    )
    return output, h_n, c_n


def assert_rounding_matches(ours, rounded, exact32, exact):
    """ours (float32, bf16_products) against the reference with the same rounding: most
    elements (the median) within float32's precision (4 times the error of the unrounded
    reference run in float32, plus a few float32 ulps of the result), a margin well under the
    rounding's own effect (the reference with and without it); every element within half of
    that effect (the whole of it for products in float32).
    (Where a value falls within float32's error of a point halfway between two bfloat16
    values, the two round it apart, a bfloat16 step, and what it feeds differs from there on:
    rarely, but it happens at these sizes.)"""
    for a, r, e32, e in zip(ours, rounded, exact32, exact):
        if e.numel() == 0:
            continue
        ulps = 8 * torch.finfo(torch.float32).eps * e.abs().max().item()
        margin = 4 * (e32.double() - e).abs().max().item() + ulps
        effect = (r - e).abs().max().item()
        # the test tells rounding apart, where there is any (there is none where every operand
        # is a bfloat16 value already: one step from a zero state)
        assert effect == 0 or margin < 0.5 * effect
        distance = (a.double() - r).abs()
        assert distance.median().item() <= margin
        assert distance.max().item() <= max(0.5 * effect, margin)


def random_layer(mode, shape, bidirectional, with_lengths, seed):
    """bfloat16 values (in float64) of x [T, B, I] and the weights, and sorted lengths."""
    T, B, I, H, proj = shape
    torch.manual_seed(seed)
    D = 2 if bidirectional else 1
    weights = [bf16_values(w) for w in layer_weights(mode, I, H, directions=D, proj=proj)]
    x = bf16_values(torch.randn(T, B, I))
    lengths = torch.randint(0, T + 1, (B,)).sort(descending=True).values if with_lengths else None
    return x, weights, lengths


# (T, B, I, H, proj): partial tiles (N = 4H or I not a multiple of 32), an odd K (I = 33:
# the last pair padded), blocks of fewer than 8 rows and more (B = 5, 11), a projection, and
# an input wider than one chunk of pairs on the stack (I = 2100 > 2048). Every product is
# wider than 16 columns: narrower ones stay in float32 (packed_gemm.h's narrow products).
SHAPES = [(20, 5, 33, 37, 0), (6, 11, 17, 64, 0), (20, 5, 33, 40, 24), (5, 4, 2100, 17, 0)]


@needs_bf16_dot
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}P{}".format(*s))
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("split", ["units", "rows"])
def test_outputs_round_operands(mode, shape, bidirectional, with_lengths, split, monkeypatch):
    """Forward with bf16_products against the reference with the same rounding (in float64):
    assert_rounding_matches."""
    if shape[4] and mode != "LSTM":
        pytest.skip("projections are LSTM-only")
    monkeypatch.setenv("RNNEXT_CPU_TEAM_SPLIT", split)
    x, weights, lengths = random_layer(mode, shape, bidirectional, with_lengths, seed=1)
    kwargs = dict(bidirectional=bidirectional, lengths=lengths)
    rounded = reference.recurrent_layer(mode, x, weights, bf16_products=True, **kwargs)
    exact = reference.recurrent_layer(mode, x, weights, **kwargs)
    x32, weights32 = x.float(), [w.float() for w in weights]
    exact32 = reference.recurrent_layer(mode, x32, weights32, **kwargs)
    with torch.no_grad():
        ours = layer_output(mode, x32, weights32, bidirectional, lengths, True)
    assert_rounding_matches(ours, rounded, exact32, exact)


# (T, B, I, H, proj): as SHAPES; H = 64 and B = 8 let two threads share a direction's steps (by
# units or by rows); an LSTM's G * H = 2080 > 2048 makes its backward's dx and dh products
# take K in chunks
GRADIENT_SHAPES = [(20, 5, 33, 37, 0), (12, 8, 33, 64, 0), (20, 5, 33, 40, 24), (5, 4, 17, 520, 0)]


@needs_bf16_dot
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", GRADIENT_SHAPES, ids=lambda s: "T{}B{}I{}H{}P{}".format(*s))
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("split", ["units", "rows"])
def test_gradients_round_operands(mode, shape, bidirectional, split, monkeypatch):
    """Backward with bf16_products (the gate gradients rounded where they meet a weight or make
    a weight's gradient, and x and the states in the weight gradients) against the reference
    whose products round the same (reference.bf16_product), with lengths:
    assert_rounding_matches for the input's and every weight's gradient."""
    if shape[4] and mode != "LSTM":
        pytest.skip("projections are LSTM-only")
    monkeypatch.setenv("RNNEXT_CPU_TEAM_SPLIT", split)
    x, weights, lengths = random_layer(mode, shape, bidirectional, True, seed=2)

    def gradients(dtype, run):
        leaves = [t.to(dtype).requires_grad_() for t in (x, *weights)]
        return torch.autograd.grad(weighted_loss(*run(leaves[0], leaves[1:])), leaves)

    def in_reference(dtype, bf16_products):
        return gradients(
            dtype,
            lambda xs, ws: reference.recurrent_layer(
                mode,
                xs,
                ws,
                bidirectional=bidirectional,
                lengths=lengths,
                bf16_products=bf16_products,
            ),
        )

    ours = gradients(
        torch.float32, lambda xs, ws: layer_output(mode, xs, ws, bidirectional, lengths, True)
    )
    rounded, exact32 = in_reference(torch.float64, True), in_reference(torch.float32, False)
    assert_rounding_matches(ours, rounded, exact32, in_reference(torch.float64, False))


@pytest.mark.parametrize("mode", MODES)
def test_flag_changes_nothing_where_disabled(mode, monkeypatch):
    """Without AVX512-BF16, or with RNNEXT_CPU_BF16_PRODUCTS=0, bf16_products leaves the
    float32 computation as it is, bitwise: outputs and gradients; bfloat16 weights (a
    bfloat16 module's) are then converted in the op, and get their float32 gradients rounded."""
    monkeypatch.setenv("RNNEXT_CPU_BF16_PRODUCTS", "0")
    assert not functional.cpu_bf16_products()
    torch.manual_seed(3)
    weights = [bf16_values(w).float() for w in layer_weights(mode, 33, 40)]
    x = torch.randn(20, 5, 33)
    results = []
    for bf16_products, dtype in (
        (False, torch.float32),
        (True, torch.float32),
        (True, torch.bfloat16),
    ):
        leaves = [x.clone().requires_grad_()] + [w.to(dtype).requires_grad_() for w in weights]
        out = layer_output(mode, leaves[0], leaves[1:], False, None, bf16_products)
        results.append([*out, *torch.autograd.grad(weighted_loss(*out), leaves)])
    for plain, flagged, bf16_weights in zip(*results):
        assert torch.equal(plain, flagged)
        assert torch.equal(plain.to(bf16_weights.dtype), bf16_weights)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("proj", [0, 24], ids=["noproj", "proj"])
def test_bfloat16_module_as_accurate_as_torch_nn(mode, proj):
    """A module converted with .bfloat16() against torch.nn's, both measured against the exact
    (float64) result on the same bfloat16 weights and input: rnnext's error in the output and
    in every gradient at most 1.5 times torch.nn's (it runs everything but the products in
    float32, where torch.nn rounds more often), plus a quarter of a bfloat16 step."""
    if proj and mode != "LSTM":
        pytest.skip("projections are LSTM-only")
    torch.manual_seed(4)
    T, B, I, H = 20, 5, 33, 40
    kwargs = dict(proj_size=proj) if proj else {}
    theirs = make_module(mode, I, H, nn=True, **kwargs).bfloat16()
    ours = make_module(mode, I, H, nn=False, **kwargs).bfloat16()
    ours.load_state_dict(theirs.state_dict())
    exact = make_module(mode, I, H, nn=True, **kwargs).double()
    exact.load_state_dict(theirs.state_dict())
    x = torch.randn(T, B, I).bfloat16()
    weight = torch.randn(T, B, proj or H, dtype=torch.float64)
    results = []
    for module, dtype in ((theirs, torch.bfloat16), (ours, torch.bfloat16), (exact, torch.float64)):
        xi = x.to(dtype).detach().requires_grad_()
        output = module(xi)[0]
        assert output.dtype == dtype
        (output.double() * weight).sum().backward()
        results.append(
            [output.double(), xi.grad.double()] + [p.grad.double() for p in module.parameters()]
        )
    for a, b, e in zip(*results):
        step = 2.0**-8 * e.abs().max().item()
        assert (b - e).abs().max().item() <= 1.5 * (a - e).abs().max().item() + 0.25 * step


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_bfloat16_module_with_checkpoints(mode):
    """checkpoint_every on a bfloat16 module (the segments' calls carry bf16_products too): the
    same outputs, and gradients equal within one bfloat16 spacing at their scale (each
    segment's first step adds its h0 term to W_hh's gradient in float32, unrounded)."""
    torch.manual_seed(5)
    plain = make_module(mode, 33, 40, nn=False).bfloat16()
    checkpointed = make_module(mode, 33, 40, nn=False, checkpoint_every=5).bfloat16()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(20, 5, 33).bfloat16()
    results = []
    for module in (plain, checkpointed):
        leaf = x.detach().requires_grad_()
        output = module(leaf)[0]
        weight = torch.arange(output.numel()).reshape(output.shape) % 7 + 1
        (output.float() * weight).sum().backward()
        results.append([output, leaf.grad, *(p.grad for p in module.parameters())])
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1:], results[1][1:]):
        ulp = 2.0**-7 * b.float().abs().max().item()  # bfloat16's spacing at most, there
        assert (a.float() - b.float()).abs().max().item() <= ulp


# (T, B, I, H, proj): calls of 1 to 3 steps and under 17 rows (bfloat16 weights are packed at
# every size), an odd I (the transposed pack's element path), an even one (its 32-bit path)
WEIGHT_SHAPES = [(1, 1, 33, 40, 0), (2, 5, 17, 37, 0), (3, 4, 33, 64, 24), (20, 5, 32, 40, 0)]


@needs_bf16_dot
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=lambda s: "T{}B{}I{}H{}P{}".format(*s))
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_bfloat16_weights_into_the_op(mode, shape, bidirectional):
    """bfloat16 weights beside float32 input (what a bfloat16 module hands the op): packed
    from their own bits at any call size. Outputs and the input's gradient as
    assert_rounding_matches; the weights' gradients come back in bfloat16: 95% of their
    elements within one bfloat16 rounding of the rounding reference's (plus float32's
    margin), every one within half the rounding's effect plus a bfloat16 step of the scale."""
    if shape[4] and mode != "LSTM":
        pytest.skip("projections are LSTM-only")
    x, weights, lengths = random_layer(mode, shape, bidirectional, True, seed=6)
    leaves = [x.float().requires_grad_()] + [w.bfloat16().requires_grad_() for w in weights]
    out = layer_output(mode, leaves[0], leaves[1:], bidirectional, lengths, True)
    ours = [*out, *torch.autograd.grad(weighted_loss(*out), leaves)]
    assert all(g.dtype == torch.bfloat16 for g in ours[4:])

    def reference_run(dtype, bf16_products):
        ref_leaves = [t.to(dtype).requires_grad_() for t in (x, *weights)]
        result = reference.recurrent_layer(
            mode,
            ref_leaves[0],
            ref_leaves[1:],
            bidirectional=bidirectional,
            lengths=lengths,
            bf16_products=bf16_products,
        )
        return [*result, *torch.autograd.grad(weighted_loss(*result), ref_leaves)]

    rounded, exact32 = reference_run(torch.float64, True), reference_run(torch.float32, False)
    exact = reference_run(torch.float64, False)
    assert_rounding_matches(ours[:4], rounded[:4], exact32[:4], exact[:4])
    for a, r, e32, e in zip(ours[4:], rounded[4:], exact32[4:], exact[4:]):
        margin = 4 * (e32.double() - e).abs().max().item()
        distance = (a.double() - r).abs()
        assert (distance <= 2.0**-8 * r.abs() + margin).double().mean().item() >= 0.95
        step = 2.0**-8 * r.abs().max().item()
        assert distance.max().item() <= 0.5 * (r - e).abs().max().item() + step


@needs_bf16_dot
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(6, 3, 8, 40, 0), (5, 4, 33, 4, 0), (4, 5, 33, 40, 5)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_state", [False, True], ids=["noh0", "h0"])
def test_bfloat16_weights_equal_their_float32_values(mode, shape, bias, with_state):
    """For calls large enough to pack (T >= 4, T * B >= 17), bfloat16 weights give bitwise what
    float32 weights holding the same values give with bf16_products (outputs, states, the
    input's and the states' gradients), and their gradients are those float32 gradients
    rounded once: narrow products (I = 8, H = 4, P = 5), no biases, a given state (the h0
    term of W_hh's gradient), both directions."""
    T, B, I, H, proj = shape
    if proj and mode != "LSTM":
        pytest.skip("projections are LSTM-only")
    torch.manual_seed(7)
    weights = [
        bf16_values(w).float()
        for w in layer_weights(mode, I, H, bias=bias, directions=2, proj=proj)
    ]
    x = torch.randn(T, B, I)
    hx = torch.randn(2, B, proj or H) if with_state else None
    cx = torch.randn(2, B, H) if with_state and mode == "LSTM" else None
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [t.clone().requires_grad_() for t in (x, *(s for s in (hx, cx) if s is not None))]
        ws = [w.to(dtype).requires_grad_() for w in weights]
        h, c = leaves[1] if with_state else None, leaves[2] if cx is not None else None
        out = layer_output(mode, leaves[0], ws, True, None, True, bias=bias, hx=h, cx=c)
        grads = torch.autograd.grad(weighted_loss(*out), leaves + ws)
        results.append((out, grads[: len(leaves)], grads[len(leaves) :]))
    (out32, state32, w32), (out16, state16, w16) = results
    for a, b in zip([*out32, *state32], [*out16, *state16]):
        assert torch.equal(a, b)
    for a, b in zip(w32, w16):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b)


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_bfloat16_module_second_derivatives(mode):
    """create_graph=True through a bfloat16 module on the CPU (its bfloat16 weights beside
    float32 input in the reference's recomputation): finite second derivatives."""
    torch.manual_seed(8)
    module = make_module(mode, 6, 8, nn=False).bfloat16()
    x = torch.randn(5, 4, 6).bfloat16().requires_grad_()
    (grad_x,) = torch.autograd.grad(module(x)[0].float().pow(2).sum(), x, create_graph=True)
    second = torch.autograd.grad(grad_x.float().sum(), module.weight_hh_l0)[0]
    assert second.dtype == torch.bfloat16 and second.shape == module.weight_hh_l0.shape
    assert torch.isfinite(second.float()).all() and second.float().abs().sum() > 0
