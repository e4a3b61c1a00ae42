"""fromscratch.fast.dropout: dropout's rate, scale and gradient from four 16-bit numbers per word."""

import math

import pytest
import torch
import torch.nn as nn

from fromscratch.fast.dropout import Dropout, dropped_fraction, dropout, keep_mask


def _within(observed: float, expected: float, n: int, sigmas: float = 6.0) -> bool:
    return abs(observed - expected) <= sigmas * math.sqrt(expected * (1 - expected) / n)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_each_of_a_words_four_numbers_drops_at_the_rate(p):
    torch.manual_seed(0)
    n = 1 << 20
    keep = keep_mask(torch.Size([n // 4, 4]), p)  # column j: the j-th 16-bit number of each word
    q = dropped_fraction(p)
    assert abs(q - p) <= 0.5 / 65536
    for column in keep.unbind(1):  # the word's top 16 bits included (random_() alone leaves the sign bit 0)
        assert _within(1 - column.float().mean().item(), q, n // 4)


def test_the_four_numbers_of_a_word_are_independent():
    torch.manual_seed(1)
    keep = keep_mask(torch.Size([1 << 18, 4]), 0.5)
    both = (~keep[:, 0] & ~keep[:, 3]).float().mean().item()  # dropped in the lowest and in the highest lane
    assert _within(both, 0.25, 1 << 18)


def test_kept_values_are_scaled_so_the_expectation_is_exact():
    torch.manual_seed(2)
    x = torch.ones(1 << 20)
    y = dropout(x, 0.1)
    q = dropped_fraction(0.1)
    kept = y[y != 0]
    assert torch.equal(kept, torch.full_like(kept, 1 / (1 - q)))
    assert _within(1 - len(kept) / len(x), q, len(x))
    assert abs(y.mean().item() - 1.0) < 6 * math.sqrt(q / (1 - q) / len(x))


def test_the_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(3)
    x = torch.randn(64, 48, requires_grad=True)
    y = dropout(x, 0.25)
    grad = torch.randn_like(y)
    y.backward(grad)
    keep = y != 0  # x is never exactly 0
    scale = 1 / (1 - dropped_fraction(0.25))
    torch.testing.assert_close(y, x.detach() * keep * scale, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, grad * keep * scale, rtol=0, atol=0)


def test_masks_differ_between_calls_and_repeat_under_the_same_seed():
    x = torch.ones(63, 65)  # not a multiple of four: the last word's spare numbers go unused
    torch.manual_seed(4)
    first, second = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(4)
    assert torch.equal(dropout(x, 0.5), first)
    assert not torch.equal(first, second)


def test_the_module_is_nn_dropout_where_its_path_does_not_apply():
    torch.manual_seed(5)
    x = torch.randn(8, 16)
    module = Dropout(0.5)
    assert isinstance(module, nn.Dropout)
    module.eval()
    assert torch.equal(module(x), x)
    module.train()
    y = module(x)
    assert ((y == 0) | torch.isclose(y, 2 * x)).all() and (y == 0).any()
    assert torch.equal(Dropout(0.0)(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))


def test_bfloat16_keeps_its_dtype():
    torch.manual_seed(6)
    x = torch.randn(32, 32, dtype=torch.bfloat16, requires_grad=True)
    y = Dropout(0.1).train()(x)
    y.sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
