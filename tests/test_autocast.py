"""Half types and autocast: on CUDA the layer runs in the half or autocast dtype; on the CPU
in float32, returning the dtype asked for."""

from __future__ import annotations

import pytest
import torch
from conftest import MODES, flat, make_module, module_pair, weighted_loss

from rnnext import functional, reference


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [4, 20], ids=lambda t: f"T{t}")
def test_cpu_autocast_runs_in_float32(mode, T):
    """Under CPU autocast (bfloat16), a bfloat16 activation from a Linear layer goes into the
    layer, which computes and returns float32; the float32 parameters get float32 gradients.
    Its products with the weights take bfloat16 operands where the CPU can (calls of at
    least 4 steps and 17 rows, products wider than 16 columns): equal, to float32's precision
    for most elements, to the reference with that rounding (tests/test_bf16.py); elsewhere (4
    steps of 3 rows here) equal to a float32 call on the same values."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5)
    layer = make_module(mode, 5, 40, nn=False)
    x = torch.randn(T, 3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = linear(x)
        output = layer(features)[0]
    assert features.dtype == torch.bfloat16
    assert output.dtype == torch.float32
    if T * 3 >= 17 and functional.cpu_bf16_products():
        weights = [w.detach().double() for w in layer._flat_weights]
        values = features.detach().double()
        rounded = reference.recurrent_layer(mode, values, weights, bf16_products=True)[0]
        exact = reference.recurrent_layer(mode, values, weights)[0]
        distance = (output.double() - rounded).abs()
        assert distance.median() <= 1e-6 < (exact - rounded).abs().median()
    else:
        torch.testing.assert_close(output, layer(features.float())[0])
    output.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_autocast_runs_in_half(mode, dtype):
    """Under CUDA autocast the layer computes in the autocast dtype (the same values as the
    module converted to it) and returns it; float32 parameters get float32 gradients. For
    float16 that is torch.nn's behaviour too; under bfloat16 autocast torch.nn's cuDNN path
    computes in float16 (seen with torch 2.11), where rnnext honours the bfloat16 asked for."""
    torch.manual_seed(0)
    layer = make_module(mode, 5, 7, nn=False).cuda()
    theirs = make_module(mode, 5, 7, nn=True).cuda()
    theirs.load_state_dict(layer.state_dict())
    x = torch.randn(4, 3, 5, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        output = layer(x)[0]
        their_dtype = theirs(x)[0].dtype
    assert output.dtype == dtype
    assert their_dtype == torch.float16 or their_dtype == dtype
    half = make_module(mode, 5, 7, nn=False).cuda().to(dtype)
    half.load_state_dict(layer.state_dict())
    torch.testing.assert_close(output, half(x.to(dtype))[0])
    output.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_cpu_half_types_compute_in_float32(mode, dtype):
    """A module converted to float16 or bfloat16 runs on the CPU (as torch.nn's does): it
    computes in float32 on the half values and returns the half type, bitwise what a float32
    call on the converted values gives, gradients included (in each tensor's own dtype);
    outputs and states agree with torch.nn's half-type results within a few of the type's
    rounding steps. (bfloat16 on a CPU with AVX512-BF16 rounds the operands of the weight
    products as well: tests/test_bf16.py; there only the dtypes and the agreement with torch.nn
    are checked here.)"""
    torch.manual_seed(0)
    # one layer: between layers the activations are in the half type, as in torch.nn
    theirs, ours = module_pair(mode, 6, 8, dtype=dtype, bidirectional=True)
    wide = make_module(mode, 6, 8, nn=False, bidirectional=True)
    wide.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    x = torch.randn(7, 3, 6).to(dtype)
    lengths = torch.tensor([7, 2, 5])

    def run(module, inp, cast):
        leaf = inp.detach().requires_grad_()
        result = [cast(t) for t in flat(module(leaf, lengths=lengths))]
        result += [] if mode == "LSTM" else [result[0].new_zeros(0)]
        grads = torch.autograd.grad(weighted_loss(*result), [leaf, *module.parameters()])
        return result, grads

    got, got_grads = run(ours, x, lambda t: t)
    want, want_grads = run(wide, x.float(), lambda t: t.to(dtype))
    assert all(t.dtype == dtype for t in (*got, *got_grads))
    if not (dtype == torch.bfloat16 and functional.cpu_bf16_products()):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        for a, b in zip(got_grads, want_grads):
            assert torch.equal(a, b.to(dtype))
    eps = torch.finfo(dtype).eps
    with torch.no_grad():
        for a, b in zip(flat(ours(x)), flat(theirs(x))):
            torch.testing.assert_close(a.float(), b.float(), rtol=4 * eps, atol=4 * eps)
