"""Autocast: on CUDA the layer runs in the autocast dtype; on the CPU in float32."""

from __future__ import annotations

import pytest
import torch
from conftest import MODES, make_module


@pytest.mark.parametrize("mode", MODES)
def test_cpu_autocast_runs_in_float32(mode):
    """Under CPU autocast (bfloat16), a bfloat16 activation from a Linear layer goes into the
    layer, which computes and returns float32, equal to a float32 call on the same values;
    the float32 parameters get float32 gradients."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5)
    layer = make_module(mode, 5, 7, nn=False)
    x = torch.randn(4, 3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = linear(x)
        output = layer(features)[0]
    assert features.dtype == torch.bfloat16
    assert output.dtype == torch.float32
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
