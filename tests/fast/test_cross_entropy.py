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
