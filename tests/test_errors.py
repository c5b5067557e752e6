"""Bad input raises an error that names the argument, what was expected and what came."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import MODES, layer_weights, make_module

from rnnext import functional

op = torch.ops.rnnext.layer_forward


def args(mode="GRU", T=4, B=2, I=3, H=5, dtype=torch.float32):
    x = torch.randn(T, B, I, dtype=dtype)
    weights = [w.detach() for w in layer_weights(mode, I, H, dtype=dtype)]
    return x, weights


def raises(exc, *parts):
    """pytest.raises matching every part of the message, in order."""
    return pytest.raises(exc, match=".*".join(re.escape(p) for p in parts))


def test_op_wrong_rank():
    x, w = args()
    with raises(ValueError, "input must be 3-D [T, B, I]", "got 2-D", "[4, 3]"):
        op("GRU", x[:, 0], w, None, None, True, False, None, False)


def test_op_mismatched_weight_shape():
    x, w = args()
    w[1] = torch.randn(15, 4)
    with raises(ValueError, "weights[1] (w_hh) must have shape [15, 5]", "got [15, 4]"):
        op("GRU", x, w, None, None, True, False, None, False)
    x, w = args()
    with raises(ValueError, "weights[0] (w_ih) must have shape [15, 4]", "got [15, 3]"):
        op("GRU", torch.randn(4, 2, 4), w, None, None, True, False, None, False)


def test_op_weight_count():
    x, w = args()
    with raises(ValueError, "weights must hold 4 tensors", "got 3"):
        op("GRU", x, w[:3], None, None, True, False, None, False)


def test_op_dtype_mismatch():
    x, w = args()
    with raises(TypeError, "weights[0] (w_ih) must have the input's dtype Double", "got Float"):
        op("GRU", x.double(), w, None, None, True, False, None, False)
    with raises(TypeError, "input must be float32 or float64", "got Int"):
        op("GRU", x.int(), w, None, None, True, False, None, False)
    with raises(TypeError, "hx must have the input's dtype Float", "got Double"):
        op("GRU", x, w, torch.zeros(1, 2, 5, dtype=torch.float64), None, True, False, None, False)


@pytest.mark.parametrize("bf16_enabled", ["1", "0"])
def test_op_bfloat16_weights_rules(bf16_enabled, monkeypatch):
    """bfloat16 weights beside float32 input are taken only with bf16_products, on the CPU, all
    of them bfloat16 (whether or not this CPU's products take them), and never beside float64
    input."""
    monkeypatch.setenv("RNNEXT_CPU_BF16_PRODUCTS", bf16_enabled)
    x, w = args()
    bf16 = [t.bfloat16() for t in w]
    with raises(TypeError, "weights[0] (w_ih) must have the input's dtype Float", "got BFloat16"):
        op("GRU", x, bf16, None, None, True, False, None, False)
    mixed = [bf16[0], w[1], *bf16[2:]]
    with raises(TypeError, "weights[1] (w_hh) must be BFloat16 like weights[0]", "got Float"):
        op("GRU", x, mixed, None, None, True, False, None, False, True)
    with raises(TypeError, "weights[0] (w_ih) must have the input's dtype Double"):
        op("GRU", x.double(), bf16, None, None, True, False, None, False, True)
    output = op("GRU", x, bf16, None, None, True, False, None, False, True)[0]
    assert output.dtype == torch.float32 and torch.isfinite(output).all()


def test_op_hidden_state_shape():
    x, w = args()
    with raises(ValueError, "hx must have shape [1, 2, 5]", "got [1, 3, 5]"):
        op("GRU", x, w, torch.zeros(1, 3, 5), None, True, False, None, False)
    x, w = args("LSTM")
    with raises(ValueError, "cx must have shape [1, 2, 5]", "got [2, 5]"):
        op("LSTM", x, w, None, torch.zeros(2, 5), True, False, None, False)


def test_op_mode_and_unsupported_arguments():
    x, w = args()
    with raises(ValueError, "mode must be one of", "got 'gru'"):
        op("gru", x, w, None, None, True, False, None, False)
    with raises(ValueError, "cx must be None for mode 'GRU'", "got a tensor of shape [1, 2, 5]"):
        op("GRU", x, w, None, torch.zeros(1, 2, 5), True, False, None, False)


def test_op_backward_checks_workspace():
    x, w = args()
    output, h_n, _, workspace = op("GRU", x, w, None, None, True, False, None, False)
    with raises(ValueError, "workspace must have shape [1, 4, 2, 20]", "got [0]"):
        torch.ops.rnnext.layer_backward(
            "GRU",
            x,
            w,
            None,
            None,
            output,
            workspace,
            output,
            None,
            None,
            True,
            False,
            None,
            [True, True, True],
        )


def test_weights_on_another_device():
    x, w = args()
    w[1] = w[1].to("meta")
    with raises(ValueError, "weights[1]", "must be on the input's device cpu", "got meta"):
        functional.recurrent_layer("GRU", x, w)


@pytest.mark.parametrize("mode", MODES)
def test_module_errors_match_torch_nn(mode):
    """The modules raise what torch.nn raises, with torch.nn's messages."""
    ours, theirs = (make_module(mode, 3, 4, nn=nn) for nn in (False, True))
    bad_state = torch.zeros(1, 3, 4)
    hx_bad = (bad_state, torch.zeros(1, 2, 4)) if mode == "LSTM" else bad_state
    with raises(
        ValueError, f"rnnext.{type(ours).__name__}", "Expected input to be 2D or 3D", "got 4D"
    ):
        ours(torch.randn(5, 2, 3, 1))
    cases = [
        (torch.randn(5, 2, 4), None),  # wrong input size
        (torch.randn(5, 2, 3), hx_bad),  # hidden state of the wrong shape
    ]
    for x, hx in cases:
        with pytest.raises(Exception) as expected:
            theirs(x, hx)
        with pytest.raises(type(expected.value)) as got:
            ours(x, hx)
        assert str(got.value) == str(expected.value)
    # the input's dtype differs from the weights': the message of recent torch.nn (torch 2.4
    # and 2.5 said "input must have the type ...")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError):
        theirs(x)
    with raises(
        ValueError, "RNN input dtype (torch.float64) does not match weight dtype", "(torch.float32)"
    ):
        ours(x)


def test_op_lengths():
    x, w = args()
    cases = [
        (torch.tensor([4]), ValueError, ("lengths must be 1-D of size B = 2", "got shape [1]")),
        (torch.tensor([4.0, 2.0]), TypeError, ("lengths must be int64 or int32", "got Float")),
        (torch.tensor([5, 2]), ValueError, ("lengths must lie in [0, T = 4]", "lengths[0] = 5")),
        (torch.tensor([4, -1]), ValueError, ("lengths must lie in [0, T = 4]", "lengths[1] = -1")),
    ]
    for lengths, exc, parts in cases:
        with raises(exc, *parts):
            op("GRU", x, w, None, None, True, False, lengths, False)


def test_module_lengths():
    gru = make_module("GRU", 3, 4, nn=False)
    x = torch.randn(5, 2, 3)
    with raises(ValueError, "lengths must be 1-D of size B = 2", "got [3]"):
        gru(x, lengths=torch.tensor([5, 2, 1]))
    with raises(TypeError, "lengths must be int64 or int32", "float32"):
        gru(x, lengths=torch.tensor([5.0, 2.0]))
    with raises(ValueError, "lengths must lie in [0, T = 5]", "= 6"):
        gru(x, lengths=torch.tensor([6, 2]))
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [5, 2])
    with raises(ValueError, "lengths must be None for a PackedSequence input"):
        gru(packed, lengths=torch.tensor([5, 2]))


def test_op_projection_weight_shape():
    x, w = args("LSTM")
    w.append(torch.randn(3, 4))  # w_hr must be [P, H] = [P, 5]
    w[1] = torch.randn(20, 3)
    with raises(ValueError, "weights[4] (w_hr) must have shape [3, 5]", "got [3, 4]"):
        op("LSTM", x, w, None, None, True, False, None, False)


def test_functional_lengths_checked():
    x, w = args()
    for lengths, exc, parts in [
        (torch.tensor([3]), ValueError, ("lengths must be 1-D of size B = 2", "got [1]")),
        (torch.tensor([[3, 1]]), ValueError, ("lengths must be 1-D of size B = 2", "[1, 2]")),
        (torch.tensor([3.0, 1.0]), TypeError, ("lengths must be int64 or int32", "float32")),
    ]:
        with raises(exc, *parts):
            functional.recurrent_layer("GRU", x, w, lengths=lengths)
    with raises(ValueError, "hx must be [D, B = 2, size]", "got shape [1, 3, 5]"):
        functional.recurrent_layer("GRU", x, w, torch.zeros(1, 3, 5), lengths=torch.tensor([4, 2]))


def test_unbatched_input_takes_a_list_of_lengths():
    gru = make_module("GRU", 3, 4, nn=False)
    x = torch.randn(5, 3)
    out, h = gru(x, lengths=[3])
    torch.testing.assert_close(out[:3], gru(x[:3])[0])
    assert out[3:].abs().sum() == 0 and h.shape == (1, 4)


def test_device_without_kernels(monkeypatch):
    x, w = args()
    monkeypatch.setattr(functional, "DEVICES_WITH_KERNELS", frozenset({"meta"}))
    with raises(NotImplementedError, "no kernels for device 'cpu'", "it runs on: meta"):
        functional.recurrent_layer("GRU", x, w)


def _forward_args(mode="LSTM"):
    """layer_forward's tensor arguments by name, for a 2-direction layer with states."""
    x, _ = args(mode)
    weights = [w.detach() for w in layer_weights(mode, 3, 5, directions=2, dtype=torch.float32)]
    states = dict(hx=torch.zeros(2, 2, 5), cx=torch.zeros(2, 2, 5))
    return dict(input=x, weights=weights, lengths=torch.tensor([4, 2]), **states)


def _call_forward(a, mode="LSTM"):
    return op(mode, a["input"], a["weights"], a["hx"], a["cx"], True, True, a["lengths"], True)


FORWARD_TENSORS = ["input", "hx", "cx"] + [f"weights[{k}]" for k in range(8)]


def _replace(a, name, make):
    if name.startswith("weights["):
        k = int(name[8:-1])
        a["weights"][k] = make(a["weights"][k])
    else:
        a[name] = make(a[name])


@pytest.mark.parametrize("name", FORWARD_TENSORS)
def test_every_forward_tensor_checks_dtype_and_device(name):
    """Each tensor argument of layer_forward in the wrong dtype, or on another device, raises
    an error that names it."""
    a = _forward_args()
    _replace(a, name, lambda t: t.int() if name == "input" else t.double())
    expected = "input must be float32" if name == "input" else name
    with pytest.raises(TypeError, match=re.escape(expected)):
        _call_forward(a)
    if name != "input":
        a = _forward_args()
        _replace(a, name, lambda t: t.to("meta"))
        with raises(ValueError, name, "must be on the input's device cpu", "got meta"):
            _call_forward(a)


def test_lengths_on_another_device():
    a = _forward_args()
    a["lengths"] = torch.tensor([4, 2], device="meta")
    with raises(ValueError, "lengths must be on the CPU or on the input's device"):
        _call_forward(a)


BACKWARD_TENSORS = ["output", "workspace", "grad_output", "grad_h_n", "grad_c_n"]


@pytest.mark.parametrize("name", BACKWARD_TENSORS)
@pytest.mark.parametrize("fault", ["dtype", "device", "shape"])
def test_every_backward_tensor_is_checked(name, fault):
    """Each tensor that layer_backward takes besides the forward's arguments is checked for
    dtype, device and shape, and the error names it."""
    a = _forward_args()
    output, h_n, c_n, workspace = _call_forward(a)
    extra = dict(output=output, workspace=workspace, grad_output=output, grad_h_n=h_n)
    extra["grad_c_n"] = c_n
    bad = {"dtype": lambda t: t.double(), "device": lambda t: t.to("meta")}
    bad["shape"] = lambda t: t[..., :1]
    extra[name] = bad[fault](extra[name])
    exc = TypeError if fault == "dtype" else ValueError
    with pytest.raises(exc, match=re.escape(name)):
        torch.ops.rnnext.layer_backward(
            "LSTM",
            a["input"],
            a["weights"],
            a["hx"],
            a["cx"],
            extra["output"],
            extra["workspace"],
            extra["grad_output"],
            extra["grad_h_n"],
            extra["grad_c_n"],
            True,
            True,
            a["lengths"],
            [True, True, True],
        )


def test_no_time_steps():
    x, w = args()
    with raises(ValueError, "input must have at least one time step", "[0, 2, 3]"):
        op("GRU", x[:0], w, None, None, True, False, None, False)


@pytest.mark.skipif("cuda" in functional.DEVICES_WITH_KERNELS, reason="rnnext built with CUDA")
def test_cuda_graph_stats_without_cuda_kernels_says_so():
    with pytest.raises(RuntimeError, match="needs rnnext built with its CUDA part"):
        functional.cuda_graph_stats()
