"""Llama's opt-in fast paths on a CPU: `accelerate(model)` (same maths as model.py, faster).

It does three things, each tested to compute what the plain model computes:

1. Training products: every `nn.Linear` becomes a `fromscratch.fast.gemm.Linear` (the same
   module with the same parameters; its class adds no state), whose CPU float32 products run on
   the faster of MKL and oneDNN.
2. The training loss: `forward(targets=...)` uses `fromscratch.fast.cross_entropy`, which never
   holds the (B, T, vocab) logits.
3. Decoding one token at a time: `model.decode_step` becomes a `PackedDecoder`, which runs the
   blocks of model.py for one position on a copy of the weights laid out for it (below).

Only what it knows is accelerated. `PackedDecoder` runs a model only if every block is a
`TransformerBlock` with Llama's `Attention` and RMSNorms, and a feed-forward whose type is
registered in `PACKED_FEED_FORWARDS` (Llama's SwiGLU here; a model built on Llama registers its
own). A block of any other type — a subclass of Llama with another feed-forward, say — leaves
`decode_step` unset, and generation runs `Llama.forward` with the KV cache: slower, never wrong.

Why the packed copy. After the prompt, every step feeds one token per row through the model.
Each weight is then used for a single vector–matrix product, 2 FLOPs per weight read, so a step
costs the time it takes to stream every weight from memory (61 MB for `stories15m`, more than
the 32 MB of L3 cache, so from DRAM each time) plus PyTorch's per-operation overhead. How the
weights are laid out decides how fast they stream. With this CPU's BLAS (MKL), on the 2-core
AMD EPYC of `bench/bench_llama.py` (section "decode_layouts"; docs/performance.md):

- `nn.Linear` computes x·Wᵀ from W stored (out, in). For one row, MKL streams that layout at
  ~8 GB/s (~8 ms a token); the same products from contiguous (in, out) copies of Wᵀ run about
  twice as fast.
- MKL runs a one-row product on one core. Cut the columns of Wᵀ into blocks, stack them as a
  batch and multiply with `torch.bmm`: the batch is shared among the cores (25–34 GB/s,
  1.8–2.4 ms a token, as fast as this machine's memory lets two cores read).
- Products that read the same input are fused into one matrix: wq|wk|wv (one product instead of
  three) and w1|w3 (the SwiGLU gate and up projections). Fewer, larger products: less overhead.

On the Intel hosts measured since, whose L3 cache holds the 61 MB, MKL streams every layout at
36–52 GB/s from the cache, the blocks the slowest of the three (docs/performance.md).

The copy costs as much memory as the weights, so it is made only for CPU models up to
`fromscratch.fast.packed.PACK_MAX_BYTES`, on the first decoding step, and made again whenever a
parameter is replaced or written in place. `tests/llama/test_llama_fast.py` checks the step's logits against `Llama.forward`.
"""

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromscratch.blocks import scaled_dot_product_attention
from fromscratch.fast import gemm
from fromscratch.fast.cross_entropy import lm_cross_entropy
from fromscratch.fast.packed import (  # noqa: F401
    PackedCopy,
    blocked_matmul,
    column_blocks,
    fits_a_packed_copy,
    n_column_blocks,
    packed,
)
from fromscratch.llama.model import Attention, FeedForward, Llama, RMSNorm, TransformerBlock, apply_rope



def accelerate(model: Llama) -> Llama:
    """Switch `model` to the fast paths (see the module docstring); returns it. Its parameters,
    their names and every result stay the same."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = gemm.Linear  # a subclass that adds no state: the Parameters stay
    model.next_token_loss = lm_cross_entropy
    model.decode_step = PackedDecoder(model) if PackedDecoder.supports(model) else None
    return model


# --- the packed layout (fromscratch.fast.packed) ---------------------------------------------


class PackedSwiGLU:
    """Llama's `FeedForward` for one position: w1|w3 fused, both products in `column_blocks` form."""

    def __init__(self, ffn: FeedForward):
        self.w13 = packed(torch.cat([ffn.w1.weight, ffn.w3.weight]))
        self.w2 = packed(ffn.w2.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = blocked_matmul(x, self.w13).chunk(2, dim=-1)  # (B, hidden) each
        return blocked_matmul(F.silu(gate) * up, self.w2)


# Feed-forward types the packed step knows, and how to pack each: type → (module → callable on
# (B, d_model)). Exact types: a subclass may compute something else.
PACKED_FEED_FORWARDS: dict[type, Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]]] = {
    FeedForward: PackedSwiGLU,
}


class PackedLayer:
    """One TransformerBlock for one position: its attention products in `column_blocks` form
    (wq|wk|wv fused), its packed feed-forward, its two RMSNorm modules."""

    def __init__(self, block: TransformerBlock):
        attention = block.attention
        self.layer_index = attention.layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
        self.attention_norm, self.ffn_norm = block.attention_norm, block.ffn_norm
        self.use_sdpa = attention.use_sdpa
        self.wqkv = packed(torch.cat([attention.wq.weight, attention.wk.weight, attention.wv.weight]))
        self.wo = packed(attention.wo.weight)
        self.feed_forward = PACKED_FEED_FORWARDS[type(block.feed_forward)](block.feed_forward)

    def attention(self, x: torch.Tensor, rotations, mask, cache) -> torch.Tensor:
        """`Attention.forward` for one position: x (B, d_model) → (B, d_model)."""
        b, n_heads, n_kv_heads, head_dim = x.size(0), self.n_heads, self.n_kv_heads, self.head_dim
        qkv = blocked_matmul(x, self.wqkv)  # (B, (n_heads + 2·n_kv_heads)·head_dim)
        qk, v = qkv.split([(n_heads + n_kv_heads) * head_dim, n_kv_heads * head_dim], dim=-1)
        qk = apply_rope(qk.view(b, 1, n_heads + n_kv_heads, head_dim), rotations)  # q and k at once
        q, k = qk.view(b, n_heads + n_kv_heads, 1, head_dim).split([n_heads, n_kv_heads], dim=1)
        keys, values = cache.update(self.layer_index, k, v.view(b, n_kv_heads, 1, head_dim))
        # Grouped-query attention without repeating keys: the n_heads / n_kv_heads query heads that
        # share a key/value head become that head's rows of queries. (B, n_kv_heads, n_rep, hd)
        q = q.reshape(b, n_kv_heads, n_heads // n_kv_heads, head_dim)
        out = scaled_dot_product_attention(q, keys, values, mask=mask, use_sdpa=self.use_sdpa)
        return blocked_matmul(out.reshape(b, n_heads * head_dim), self.wo)

    def __call__(self, x: torch.Tensor, rotations, mask, cache) -> torch.Tensor:
        """`TransformerBlock.forward` for one position: x (B, d_model) → (B, d_model)."""
        x = x + self.attention(self.attention_norm(x), rotations, mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class PackedLlama:
    """`model`'s weights laid out for decoding one token per row (see the module docstring)."""

    def __init__(self, model: Llama):
        self.model = model
        with torch.no_grad():
            self.layers = [PackedLayer(block) for block in model.layers]
            self.output = packed(model.output.weight)
        self.embeddings = model.tok_embeddings.weight

    def step(self, tokens: torch.Tensor, cache, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the position after the `cache.length` cached ones: tokens (B,) → logits (B, vocab)."""
        rotations, mask = self.model.rotations_and_mask(1, cache, pad_lengths, tokens.device)
        x = self.embeddings[tokens]  # (B, d_model)
        for layer in self.layers:
            x = layer(x, rotations, mask, cache)
        cache.advance(1)
        return blocked_matmul(self.model.norm(x), self.output).float()


class PackedDecoder(PackedCopy):
    """`model.decode_step` after `accelerate`: a `PackedLlama` of the model's current weights,
    made on the first call and made again whenever a parameter is replaced or written in place."""

    def __init__(self, model: Llama):
        super().__init__(model, PackedLlama, self.supports)

    @staticmethod
    def supports(model: Llama) -> bool:
        """Whether every block is one the packed step knows, on a CPU, and the copy affordable."""
        known = all(
            type(block) is TransformerBlock and type(block.attention) is Attention
            and type(block.attention_norm) is RMSNorm and type(block.ffn_norm) is RMSNorm
            and type(block.feed_forward) in PACKED_FEED_FORWARDS
            for block in model.layers
        ) and type(model.norm) is RMSNorm
        return known and fits_a_packed_copy(model)

    def run_step(self, packed: PackedLlama | None, tokens: torch.Tensor, cache,
                 pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B,) at the position after the cached ones → logits (B, vocab_size)."""
        if packed is None:  # moved to a GPU since `accelerate`, say
            return self.model(tokens[:, None], cache=cache, pad_lengths=pad_lengths)[:, -1]
        return packed.step(tokens, cache, pad_lengths)
