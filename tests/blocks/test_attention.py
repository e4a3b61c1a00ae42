"""Scaled dot-product attention (§3.2.1) and multi-head attention (§3.2.2).

The fused (SDPA) and explicit paths of `scaled_dot_product_attention` must compute the same
thing under every mask the models use, the causal mask must hide the future, and our
MultiHeadAttention must equal PyTorch's nn.MultiheadAttention given the same weights.
"""

import pytest
import torch
import torch.nn.functional as F

from fromscratch.blocks import scaled_dot_product_attention
from fromscratch.transformer.model import MultiHeadAttention

B, H, D = 2, 3, 8


def qkv(t_q, t_k):
    return torch.randn(B, H, t_q, D), torch.randn(B, H, t_k, D), torch.randn(B, H, t_k, D)


def padding_mask(t_k, lengths=(5, 3)):
    """(B, 1, 1, T_k), True at the first `length` keys of each row."""
    return (torch.arange(t_k)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]


CASES = {
    "no mask": dict(t_q=6, t_k=6),
    "padding": dict(t_q=6, t_k=6, mask=True),
    "cross-attention padding": dict(t_q=4, t_k=7, mask=True),
    "causal": dict(t_q=6, t_k=6, is_causal=True),
    "causal + padding": dict(t_q=6, t_k=6, mask=True, is_causal=True),
    "cached decoding (T_q < T_k)": dict(t_q=3, t_k=7, is_causal=True),
    "cached decoding + padding": dict(t_q=3, t_k=7, mask=True, is_causal=True),
    "one new position": dict(t_q=1, t_k=7, is_causal=True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_sdpa_and_explicit_paths_agree(case):
    q, k, v = qkv(case["t_q"], case["t_k"])
    mask = padding_mask(case["t_k"]) if case.get("mask") else None
    is_causal = case.get("is_causal", False)
    fused = scaled_dot_product_attention(q, k, v, mask, is_causal, use_sdpa=True)
    explicit = scaled_dot_product_attention(q, k, v, mask, is_causal, use_sdpa=False)
    torch.testing.assert_close(fused, explicit, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_explicit_path_matches_pytorch_reference(case):
    """Against F.scaled_dot_product_attention given PyTorch's own boolean mask (True = attend)."""
    t_q, t_k = case["t_q"], case["t_k"]
    q, k, v = qkv(t_q, t_k)
    mask = padding_mask(t_k) if case.get("mask") else torch.ones(1, 1, 1, t_k, dtype=torch.bool)
    if case.get("is_causal"):
        # query i (the (T_k − T_q + i)-th position) may see keys j ≤ i + T_k − T_q
        mask = mask & (torch.arange(t_k)[None, :] <= torch.arange(t_q)[:, None] + t_k - t_q)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ours = scaled_dot_product_attention(q, k, v, mask=mask, use_sdpa=False)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("t_q, t_k", [(6, 6), (3, 7)])
def test_causal_mask_blocks_the_future(use_sdpa, t_q, t_k):
    q, k, v = qkv(t_q, t_k)
    out = scaled_dot_product_attention(q, k, v, is_causal=True, use_sdpa=use_sdpa)
    cut = (t_q - 1) // 2  # queries 0..cut see keys up to cut + (t_k - t_q); change every key after that
    first_hidden = cut + t_k - t_q + 1
    k2, v2 = k.clone(), v.clone()
    k2[..., first_hidden:, :] = torch.randn_like(k2[..., first_hidden:, :])
    v2[..., first_hidden:, :] = 100.0
    out2 = scaled_dot_product_attention(q, k2, v2, is_causal=True, use_sdpa=use_sdpa)
    torch.testing.assert_close(out2[..., : cut + 1, :], out[..., : cut + 1, :])
    assert not torch.allclose(out2[..., cut + 1 :, :], out[..., cut + 1 :, :])


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_padding_keys_are_ignored_and_empty_rows_stay_finite(use_sdpa):
    q, k, v = qkv(4, 6)
    mask = padding_mask(6, lengths=(6, 3))
    out = scaled_dot_product_attention(q, k, v, mask, use_sdpa=use_sdpa)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 3:], v2[1, :, 3:] = 50.0, -50.0  # only padding of row 1 changes
    torch.testing.assert_close(scaled_dot_product_attention(q, k2, v2, mask, use_sdpa=use_sdpa), out)
    nothing = torch.zeros(B, 1, 1, 6, dtype=torch.bool)
    assert torch.isfinite(scaled_dot_product_attention(q, k, v, nothing, use_sdpa=use_sdpa)).all()


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("t_q", [1, 3])
def test_groups_of_queries_share_a_key_row_as_if_it_were_repeated(use_sdpa, t_q):
    """The beams of a source attend to its one copy of the keys: 3 query rows per key row give
    what the keys repeated for each query row give (padding mask included)."""
    group = 3
    query = torch.randn(B * group, H, t_q, D)
    _, key, value = qkv(t_q, 7)
    mask = padding_mask(7)
    shared = scaled_dot_product_attention(query, key, value, mask, use_sdpa=use_sdpa)
    repeat = lambda t: t.repeat_interleave(group, dim=0)  # noqa: E731
    repeated = scaled_dot_product_attention(query, repeat(key), repeat(value), repeat(mask), use_sdpa=use_sdpa)
    torch.testing.assert_close(shared, repeated, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="cannot share 2 key rows under a causal"):
        scaled_dot_product_attention(query, key, value, is_causal=True, use_sdpa=use_sdpa)
    with pytest.raises(ValueError, match="5 query rows cannot share 2 key rows"):
        scaled_dot_product_attention(query[:5], key, value, use_sdpa=use_sdpa)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_multi_head_attention_matches_pytorch(use_sdpa):
    d_model, n_heads = 16, 4
    ours = MultiHeadAttention(d_model, n_heads, use_sdpa=use_sdpa)
    reference = torch.nn.MultiheadAttention(d_model, n_heads, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        reference.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        reference.out_proj.weight.copy_(ours.out_proj.weight)
        reference.out_proj.bias.copy_(ours.out_proj.bias)
    x, memory = torch.randn(B, 5, d_model), torch.randn(B, 7, d_model)
    keep = padding_mask(7)
    expected, _ = reference(x, memory, memory, key_padding_mask=~keep[:, 0, 0], need_weights=False)
    torch.testing.assert_close(ours(x, memory, mask=keep), expected, atol=1e-6, rtol=1e-5)


def test_recorded_weights_are_the_attention_distribution():
    mha = MultiHeadAttention(16, 4)
    x, memory = torch.randn(B, 5, 16), torch.randn(B, 7, 16)
    keep = padding_mask(7)
    mha(x, memory, mask=keep)
    assert mha.weights is None  # nothing kept unless asked
    mha.record_weights = True
    out = mha(x, memory, mask=keep)
    weights = mha.weights  # (B, n_heads, T_q, T_k)
    assert weights.shape == (B, 4, 5, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, 4, 5))
    assert (weights[1, ..., 3:] == 0).all()  # padding gets no weight
    # They are the weights the output was computed with.
    values = mha.split_heads(mha.v_proj(memory))
    merged = (weights @ values).transpose(1, 2).reshape(B, 5, 16)
    torch.testing.assert_close(mha.out_proj(merged), out, atol=1e-6, rtol=1e-5)
