"""fromscratch.fast.cross_entropy: the loss without the full logits equals F.cross_entropy,
value and gradients, chunked or not, also where the target's probability underflows float32."""

import torch
import torch.nn.functional as F

from fromscratch.fast.cross_entropy import linear_cross_entropy


def test_linear_cross_entropy_chunks_and_sums():
    h, weight = torch.randn(50, 16, requires_grad=True), torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(0, 30, (50,))
    targets[7] = -100
    expected = F.cross_entropy(h @ weight.t(), targets, reduction="sum")
    got = linear_cross_entropy(h, weight, targets, reduction="sum", chunk_rows=7)  # 8 chunks
    torch.testing.assert_close(got, expected)
    expected_grads = torch.autograd.grad(expected * 3.0, (h, weight))
    got_grads = torch.autograd.grad(got * 3.0, (h, weight))
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)
    with torch.no_grad():  # no gradient needed: only the loss is computed
        expected = F.cross_entropy(h @ weight.t(), targets)
        torch.testing.assert_close(linear_cross_entropy(h, weight, targets), expected)


def test_linear_cross_entropy_is_exact_when_the_target_probability_underflows():
    """Losses of hundreds (a target probability below float32's range) come out exact, not inf."""
    h = torch.randn(6, 16) * 40.0
    weight = torch.randn(30, 16, requires_grad=True)
    logits = h @ weight.detach().t()
    targets = logits.argmin(dim=-1)  # the least likely token of each row
    targets[0] = logits[0].argmax()  # and one ordinary row
    expected = F.cross_entropy(logits, targets, reduction="none")
    assert expected[1:].min() > 150  # e^-150 is far below float32's smallest number
    got = linear_cross_entropy(h, weight, targets, reduction="sum", chunk_rows=4)
    torch.testing.assert_close(got, expected.sum())
    got.backward()
    expected_grad, = torch.autograd.grad(F.cross_entropy(h @ weight.t(), targets, reduction="sum"), weight)
    torch.testing.assert_close(weight.grad, expected_grad)


def test_label_smoothing_and_a_bias_equal_pytorch():
    """What the Transformer trains with: label smoothing 0.1 over the vocabulary and Marian's
    logits bias; value and every gradient as F.cross_entropy(label_smoothing=...)."""
    h = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    bias = torch.randn(30, requires_grad=True)
    targets = torch.randint(0, 30, (40,))
    targets[:4] = 0  # padding, ignored
    expected = F.cross_entropy(h @ weight.t() + bias, targets, ignore_index=0, reduction="sum", label_smoothing=0.1)
    got = linear_cross_entropy(h, weight, targets, ignore_index=0, reduction="sum", chunk_rows=9, bias=bias,
                               label_smoothing=0.1)
    torch.testing.assert_close(got, expected)
    for g, e in zip(torch.autograd.grad(got * 2.0, (h, weight, bias)), torch.autograd.grad(expected * 2.0, (h, weight, bias))):
        torch.testing.assert_close(g, e)


def test_no_rows_give_a_zero_loss_and_zero_gradients():
    """A batch with nothing to predict: the loss is 0 and ∂W is zeros, not uninitialised memory
    (freed NaNs of ∂W's size first, which a fresh uninitialised tensor would likely reuse)."""
    weight = torch.ones(30, 16, requires_grad=True)
    h = torch.randn(0, 16, requires_grad=True)
    nans = torch.full((30, 16), float("nan"))
    del nans
    got = linear_cross_entropy(h, weight, torch.zeros(0, dtype=torch.long), reduction="sum")
    got.backward()
    assert got.item() == 0.0
    assert torch.equal(weight.grad, torch.zeros_like(weight))
