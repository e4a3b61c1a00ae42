"""fromscratch.fast.gemm.Linear: the oneDNN products give nn.Linear's outputs and gradients."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fromscratch.fast import gemm
from fromscratch.fast.gemm import Linear, matmul_transposed, use_onednn

needs_onednn = pytest.mark.skipif(not gemm._ONEDNN, reason="PyTorch built without oneDNN")


@pytest.fixture(autouse=True)
def fresh_shape_budget(monkeypatch):
    """Each test starts with oneDNN's whole shape budget (earlier tests may have used it up)."""
    monkeypatch.setattr(gemm, "_onednn_shapes", set())


def _pair(bias: bool):
    torch.manual_seed(0)
    ours = Linear(48, 80, bias=bias)
    reference = nn.Linear(48, 80, bias=bias)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(37, 48), (3, 29, 48)])
def test_outputs_and_gradients_equal_nn_linear(bias, shape):
    ours, reference = _pair(bias)
    x = torch.randn(shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad_out = torch.randn(*shape[:-1], 80)
    assert use_onednn(x, ours.weight)
    y = ours(x)
    y.backward(grad_out)
    y_ref = reference(x_ref)
    y_ref.backward(grad_out)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, atol=1e-4, rtol=1e-5)
    if bias:
        torch.testing.assert_close(ours.bias.grad, reference.bias.grad, atol=1e-5, rtol=1e-5)
    assert y.grad_fn.name().endswith("_OneDNNLinearBackward")


def test_frozen_input_gets_no_gradient_and_weights_still_do():
    ours, reference = _pair(False)
    x = torch.randn(5, 48)
    ours(x).sum().backward()
    reference(x).sum().backward()
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, atol=1e-4, rtol=1e-5)


def test_same_parameters_and_names_as_nn_linear():
    ours, reference = _pair(True)
    assert isinstance(ours, nn.Linear)
    assert list(ours.state_dict()) == list(reference.state_dict()) == ["weight", "bias"]


def test_elsewhere_it_is_exactly_f_linear(monkeypatch):
    ours, _ = _pair(True)
    x = torch.randn(7, 48)
    with torch.no_grad():
        assert not use_onednn(x, ours.weight)
        assert torch.equal(ours(x), F.linear(x, ours.weight, ours.bias))
    # Half precision and autocast are not taken over: the result is F.linear's, bit for bit.
    bf16 = ours.to(torch.bfloat16)
    assert not use_onednn(x.bfloat16(), bf16.weight)
    assert torch.equal(bf16(x.bfloat16()), F.linear(x.bfloat16(), bf16.weight, bf16.bias))
    ours = ours.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_onednn(x, ours.weight)
        out = ours(x)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, F.linear(x, ours.weight, ours.bias))
    monkeypatch.setattr(gemm, "USE_ONEDNN", False)
    assert torch.equal(ours(x), F.linear(x, ours.weight, ours.bias))
    assert not use_onednn(torch.randn(2, 2, device="meta"), torch.randn(3, 2, device="meta", requires_grad=True))


@needs_onednn
@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("transposed_weight", [False, True])
def test_matmul_transposed(transposed_weight, onednn):
    x = torch.randn(33, 20)
    weight = torch.randn(20, 50).t() if transposed_weight else torch.randn(50, 20)  # (50, 20)
    torch.testing.assert_close(matmul_transposed(x, weight, onednn), x @ weight.t(), atol=1e-5, rtol=1e-5)


def test_inference_never_reaches_onednn(monkeypatch):
    """oneDNN keeps a kernel per shape; inference meets endless shapes, so it must stay on MKL."""
    from fromscratch.llama import Llama, LlamaConfig, accelerate

    def refuse(*args):
        raise AssertionError("oneDNN called during inference")

    monkeypatch.setattr(gemm, "onednn_linear", refuse)
    model = accelerate(Llama(LlamaConfig.from_preset("tiny")))
    assert not use_onednn(torch.randn(3, 4), torch.randn(5, 4))  # nothing asks for a gradient
    with torch.no_grad():
        model(torch.randint(0, 512, (2, 9)))
        model(torch.randint(0, 512, (2, 9)), targets=torch.randint(0, 512, (2, 9)))
    for length in (3, 7, 12):  # prompts of different lengths, cached and not
        model.generate([1] * length, 4, temperature=0)
        model.generate([1] * length, 4, temperature=0, use_cache=False)


@needs_onednn
def test_onednn_takes_a_bounded_number_of_shapes(monkeypatch):
    """Past MAX_ONEDNN_SHAPES distinct shapes, new ones go to MKL; seen ones stay on oneDNN."""
    monkeypatch.setattr(gemm, "MAX_ONEDNN_SHAPES", 3)
    weight = torch.randn(8, 4, requires_grad=True)
    assert [use_onednn(torch.randn(rows, 4), weight) for rows in (1, 2, 3, 4, 2, 5)] == \
        [True, True, True, False, True, False]


def test_compiled_module_runs_and_agrees():
    ours, reference = _pair(True)
    x = torch.randn(4, 48)
    compiled = torch.compile(ours, backend="eager")  # dynamo traces the F.linear branch
    torch.testing.assert_close(compiled(x), reference(x), atol=1e-5, rtol=1e-5)
