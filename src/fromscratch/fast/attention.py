"""`short_attention`: the scaled dot-product attention of training on short sequences, on a CPU.

    S = Q Kᵀ / √d_k + M,   P = softmax(S),   O = P V          (§3.2.1; M: 0 or −max where masked)

Sentence pairs of the CPU recipe are at most 48 tokens a side, so in a training step each of the
Transformer's attentions is some 240 (sentence, head) blocks of about 25 × 25 scores: ~20 MFLOP
forward, nothing next to the layer's products. Yet PyTorch's CPU flash kernel took a fifth of a
`slim` training step (`aten::_scaled_dot_product_flash_attention_for_cpu` and its backward: 64 ms
of ~240, 9 calls of each), because it walks the blocks one by one with an online softmax built
for long sequences. At these lengths the whole score tensor P is small (B·H·T_q·T_k floats), so
this path keeps it and runs each step as one batched product over all the blocks:

    forward:   S = Q Kᵀ (bmm), scaled and masked in one add, P = softmax(S), O = P V (bmm)
    backward:  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ⊙ (dP − rowsum(dO ⊙ O)),
               dQ = dS K / √d_k,  dK = dSᵀ Q / √d_k                     (four bmm)

The softmax backward uses rowsum(P ⊙ dP) = rowsum(dO ⊙ O), the d_v-long sum instead of the
T_k-long one. Written with autograd instead, the same maths was no faster than the kernel: the
products then took q, k and v as strided views of the fused projection, and autograd kept the
scaled and masked scores too; here each of q, k, v is copied to (B·H, T, d_k) once.

A masked score is set as in `blocks.scaled_dot_product_attention`: the most negative finite
number, so a query with nothing to attend to averages the values instead of giving NaN.
`tests/fast/test_short_attention.py` checks values and gradients against that function.
"""

import math

import torch

from fromscratch.blocks.attention import additive_mask, with_causal_mask

MAX_KEYS = 64  # above this many keys PyTorch's kernel is as fast (bench: T 128 and 250 within ±15 %)


def applies(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether `short_attention` is the faster path: float32 on a CPU, at most MAX_KEYS keys, a
    key row per query row, eagerly (torch.compile fuses attention itself), and training (a
    gradient to compute; without one the kernel keeps nothing and is as fast)."""
    return (query.device.type == "cpu" and query.dtype == torch.float32 and key.size(-2) <= MAX_KEYS
            and query.size(0) == key.size(0) and torch.is_grad_enabled()
            and (query.requires_grad or key.requires_grad) and not torch.compiler.is_compiling())


def short_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """`blocks.scaled_dot_product_attention(query, key, value, mask, is_causal)` for equal batch
    rows (no grouped queries) and no dropout: query (B, H, T_q, d_k), key (B, H, T_k, d_k), value
    (B, H, T_k, d_v); mask boolean, broadcastable to (B, H, T_q, T_k), True where allowed; is_causal
    aligned to the end as there. Returns (B, H, T_q, d_v)."""
    if is_causal:
        mask = with_causal_mask(mask, query.size(-2), key.size(-2), query.device)
    bias = None if mask is None else additive_mask(mask, query.dtype)
    return _ShortAttention.apply(query, key, value, bias)


class _ShortAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, bias):
        b, h, t_q, d_k = query.shape
        t_k, d_v = key.size(-2), value.size(-1)
        scale = 1 / math.sqrt(d_k)
        q = query.reshape(b * h, t_q, d_k)  # copies of the strided views of the fused projection
        k = key.reshape(b * h, t_k, d_k)
        v = value.reshape(b * h, t_k, d_v)
        scores = torch.bmm(q, k.transpose(1, 2)).view(b, h, t_q, t_k)  # (B, H, T_q, T_k)
        scores = scores.mul_(scale) if bias is None else torch.add(bias, scores, alpha=scale)
        weights = scores.reshape(b * h, t_q, t_k).softmax(dim=-1)  # a view: the add writes (B, H, T_q, T_k) in order
        out = torch.bmm(weights, v)  # (B·H, T_q, d_v)
        ctx.save_for_backward(q, k, v, weights, out)
        ctx.scale = scale
        return out.view(b, h, t_q, d_v)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, weights, out = ctx.saved_tensors
        b, h, t_q, d_v = grad.shape
        grad = grad.reshape(b * h, t_q, d_v)
        grad_value = torch.bmm(weights.transpose(1, 2), grad)
        grad_weights = torch.bmm(grad, v.transpose(1, 2))  # (B·H, T_q, T_k)
        row = (grad * out).sum(dim=-1, keepdim=True)  # rowsum(P ⊙ dP) = rowsum(dO ⊙ O)
        grad_scores = grad_weights.sub_(row).mul_(weights).mul_(ctx.scale)  # dS/√d_k
        grad_query = torch.bmm(grad_scores, k)
        grad_key = torch.bmm(grad_scores.transpose(1, 2), q)
        return (grad_query.view(b, h, t_q, -1), grad_key.view(b, h, -1, k.size(-1)),
                grad_value.view(b, h, -1, d_v), None)
