"""fromscratch.fast.attention: training attention on short sequences, against the written-out maths."""

import pytest
import torch

from fromscratch.blocks import scaled_dot_product_attention
from fromscratch.fast.attention import MAX_KEYS, applies, short_attention

B, H, D = 3, 2, 8


def _inputs(t_q: int, t_k: int, strided: bool):
    """q, k, v with gradients; `strided` cuts them from one fused projection, as the model does."""
    if strided:
        fused = torch.randn(B, t_k, 3 * H * D, dtype=torch.float64, requires_grad=True)
        q, k, v = (t.view(B, t_k, H, D).transpose(1, 2) for t in fused.chunk(3, -1))
        return (q[:, :, t_k - t_q:], k, v), fused
    leaves = [torch.randn(B, H, t, D, dtype=torch.float64, requires_grad=True) for t in (t_q, t_k, t_k)]
    return leaves, leaves


def _padding(t_k: int) -> torch.Tensor:
    lengths = torch.tensor([t_k, t_k - 2, 1])
    return (torch.arange(t_k) < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T_k)


@pytest.mark.parametrize("case", ["plain", "causal", "padding", "causal_cached_prefix", "padding_and_causal"])
@pytest.mark.parametrize("strided", [False, True])
def test_values_and_gradients_equal_the_written_out_attention(case, strided):
    t_q, t_k = (3, 5) if case == "causal_cached_prefix" else (5, 5)
    mask = _padding(t_k) if "padding" in case else None
    is_causal = "causal" in case
    (q, k, v), leaves = _inputs(t_q, t_k, strided)
    upstream = torch.randn(B, H, t_q, D, dtype=torch.float64)

    def run(attention):
        out = attention(q, k, v, mask, is_causal)
        grads = torch.autograd.grad((out * upstream).sum(), leaves)
        return out, grads

    out, grads = run(short_attention)
    expected, expected_grads = run(lambda *a: scaled_dot_product_attention(*a, use_sdpa=False))
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_a_query_with_nothing_to_attend_to_averages_the_values_as_the_reference_does():
    q, k, v = (torch.randn(B, H, 4, D, requires_grad=True) for _ in range(3))
    nothing = torch.zeros(B, 1, 1, 4, dtype=torch.bool)
    out = short_attention(q, k, v, nothing)
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand_as(out))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_it_applies_to_cpu_float32_training_on_short_keys_only():
    q = torch.randn(B, H, 4, D, requires_grad=True)
    k = torch.randn(B, H, MAX_KEYS, D)
    assert applies(q, k)
    assert not applies(q, torch.randn(B, H, MAX_KEYS + 1, D))  # long keys: PyTorch's kernel
    assert not applies(q.detach(), k)  # nothing to differentiate
    with torch.no_grad():
        assert not applies(q, k)  # evaluation, decoding
    assert not applies(q.double(), k.double())
    assert not applies(q.repeat(2, 1, 1, 1), k)  # grouped queries (beam search) take blocks.attention
