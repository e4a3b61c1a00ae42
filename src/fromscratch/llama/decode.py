"""One decoding step on a CPU: the blocks of `model.py` with their weights laid out for one token.

After the prompt, every step feeds one token per row through the model. Each weight is then used
for a single vector–matrix product, 2 FLOPs per weight read, so a step costs the time it takes to
stream every weight from memory (61 MB for `stories15m`, more than the 32 MB of L3 cache, so from
DRAM each time) plus PyTorch's per-operation overhead. How the weights are laid out decides how
fast they stream. With this CPU's BLAS (MKL), on the 2-core AMD EPYC of `bench/bench_llama.py`
(section "decode_layouts": all of one token's products, cycling through every weight):

1. `nn.Linear` computes x·Wᵀ from W stored (out, in). For one row, MKL streams that layout at
   ~8 GB/s (~8 ms a token); the same products from contiguous (in, out) copies of Wᵀ run about
   twice as fast.
2. MKL runs a one-row product on one core. Cut the columns of Wᵀ into blocks, stack them as a
   batch and multiply with `torch.bmm`: the batch is shared among the cores (25–34 GB/s,
   1.8–2.4 ms a token, as fast as this machine's memory lets two cores read).
3. Products that read the same input are fused into one matrix: wq|wk|wv (one product instead of
   three) and w1|w3 (the SwiGLU gate and up projections). Fewer, larger products: less overhead.

`PackedLlama` holds that copy of the weights (as much memory again as the model, so `generate`
uses it only for models up to `PACK_MAX_BYTES` on a CPU; elsewhere it runs `Llama.forward` with
the KV cache). `step` is `TransformerBlock.forward` for one position with those products; it reuses
the model's RMSNorm, `apply_rope`, `KVCache` and the shared attention function, and
`tests/llama/test_llama_decode.py` checks its logits against `Llama.forward`.
"""

import torch
import torch.nn.functional as F

from fromscratch.llama.model import Llama, apply_rope
from fromscratch.transformer.attention import scaled_dot_product_attention

PACK_MAX_BYTES = 2**30  # models with more parameter bytes decode through Llama.forward instead


def column_blocks(weight: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """nn.Linear's (out, in) weight W → Wᵀ cut into `n_blocks` column blocks: (n_blocks, in, out/n_blocks)."""
    d_out, d_in = weight.shape
    return weight.t().reshape(d_in, n_blocks, d_out // n_blocks).transpose(0, 1).contiguous()


def blocked_matmul(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x·Wᵀ for x (B, in) and W in `column_blocks` form → (B, out). One bmm: a block per batch entry."""
    n_blocks, _, block_out = blocks.shape
    out = torch.bmm(x.expand(n_blocks, *x.shape), blocks)  # (n_blocks, B, out/n_blocks)
    return out.transpose(0, 1).reshape(x.size(0), n_blocks * block_out)  # a view when B == 1


def packed(weight: torch.Tensor) -> torch.Tensor:
    """`column_blocks` with the number of blocks chosen by `n_column_blocks`."""
    return column_blocks(weight.detach(), n_column_blocks(weight.size(0)))


def n_column_blocks(d_out: int) -> int:
    """How many column blocks to cut a matrix with `d_out` columns into.

    Chosen by timing whole decoding steps of `stories15m` on 2 cores: blocks of ~16 columns for
    the layers' matrices were fastest (far faster than one block per core), but only two blocks
    per core for the 32,000-wide classifier; and always a multiple of the core count, so that no
    core waits for another.
    """
    cores = torch.get_num_threads()
    target = 2 * cores if d_out >= 4096 else max(cores, d_out // 16)
    for n in range(target, 0, -1):
        if d_out % n == 0 and (n % cores == 0 or n < cores):
            return n
    return 1


class PackedLayer:
    """One TransformerBlock for one position: its products in `column_blocks` form (wq|wk|wv and
    w1|w3 fused), its two RMSNorm modules, and its shapes as plain attributes."""

    def __init__(self, block):
        attention, ffn = block.attention, block.feed_forward
        self.layer_index = attention.layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
        self.attention_norm, self.ffn_norm = block.attention_norm, block.ffn_norm
        self.use_sdpa = attention.use_sdpa
        self.wqkv = packed(torch.cat([attention.wq.weight, attention.wk.weight, attention.wv.weight]))
        self.wo = packed(attention.wo.weight)
        self.w13 = packed(torch.cat([ffn.w1.weight, ffn.w3.weight]))
        self.w2 = packed(ffn.w2.weight)

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
        gate, up = blocked_matmul(self.ffn_norm(x), self.w13).chunk(2, dim=-1)  # (B, hidden)
        return x + blocked_matmul(F.silu(gate) * up, self.w2)


class PackedLlama:
    """`model`'s weights laid out for decoding one token per row (see the module docstring)."""

    def __init__(self, model: Llama):
        self.model = model
        with torch.no_grad():
            self.layers = [PackedLayer(block) for block in model.layers]
            self.output = packed(model.output.weight)
        self.embeddings = model.tok_embeddings.weight
        self.key = self._weights_key(model)

    @staticmethod
    def _weights_key(model: Llama) -> tuple | None:
        """Changes whenever a parameter is replaced (its storage) or written in place (its version
        counter: optimizer steps, load_state_dict). None when that cannot be told: tensors made
        under torch.inference_mode() keep no version counter."""
        key = []
        for p in model.parameters():
            if p.is_inference():
                return None
            key.append((p.data_ptr(), p._version))
        return tuple(key)

    @classmethod
    def suits(cls, model: Llama) -> bool:
        """Whether `generate` should decode `model` this way: on a CPU, if the copy is affordable."""
        weight = model.tok_embeddings.weight
        return weight.device.type == "cpu" and sum(
            p.numel() * p.element_size() for p in model.parameters()) <= PACK_MAX_BYTES

    @classmethod
    def of(cls, model: Llama) -> "PackedLlama":
        """The packed weights of `model`, made once and kept on it until its weights change."""
        packed = getattr(model, "_packed_for_decoding", None)
        if packed is None or packed.key is None or packed.key != cls._weights_key(model):
            packed = model._packed_for_decoding = None  # free the stale copy before making anew
            packed = model._packed_for_decoding = cls(model)
        return packed

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The classifier: final hidden states (B, d_model) → (B, vocab_size) float32."""
        return blocked_matmul(h, self.output).float()

    def step(self, tokens: torch.Tensor, cache, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the position after the `cache.length` cached ones: tokens (B,) → logits (B, vocab)."""
        rotations, mask = self.model.rotations_and_mask(1, cache, pad_lengths, tokens.device)
        x = self.embeddings[tokens]  # (B, d_model)
        for layer in self.layers:
            x = layer(x, rotations, mask, cache)
        cache.length += 1
        return self.logits(self.model.norm(x))
