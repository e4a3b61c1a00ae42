"""The Transformer of Vaswani et al. (2017), "Attention Is All You Need", §3 (Figure 1).

The file follows the paper's order:
    TransformerConfig       the hyper-parameters of Table 3, with named presets
    LayerNorm               §3.1 (Ba et al. 2016), used as LayerNorm(x + Sublayer(x))
    MultiHeadAttention      §3.2.2, over scaled dot-product attention §3.2.1 (attention.py)
    FeedForward             §3.3   FFN(x) = max(0, x W1 + b1) W2 + b2
    sinusoidal_positions    §3.5
    EncoderLayer,
    DecoderLayer            §3.1, the two stacks of Figure 1
    Transformer             embeddings × √d_model with tied weights (§3.4), the stacks, the
                            output projection; `generate` (§6.1) lives in decoding.py

Where the code departs from, or adds to, the paper:
- `norm_first=True` gives pre-norm layers, x + Dropout(Sublayer(LayerNorm(x))), and a final
  LayerNorm after each stack (Xiong et al. 2020; PyTorch's `norm_first`). Pre-norm trains
  stably without a carefully tuned warm-up. The default is the paper's post-norm.
- Dropout sits only where §5.4 puts it: on each sub-layer's output before the residual add and
  on the embedding + position sums. PyTorch and tensor2tensor also drop attention weights and
  the FFN's hidden units; we do not.
- The paper does not say whether its projections have biases; we keep them, like PyTorch.
- `KVCache` / `DecoderCache` let the decoder run one new position at a time during generation
  (an implementation device, not part of the paper).
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from fromscratch.errors import UserError
from fromscratch.transformer.attention import scaled_dot_product_attention
from fromscratch.transformer.decoding import beam_search, greedy_decode


@dataclass
class TransformerConfig:
    vocab_size: int = 32000  # one joint source/target vocabulary (§5.1: shared BPE)
    d_model: int = 512
    n_heads: int = 8  # h in §3.2.2
    n_encoder_layers: int = 6  # N in §3.1
    n_decoder_layers: int = 6
    d_ff: int = 2048  # inner size of the FFN, §3.3
    dropout: float = 0.1  # P_drop in §5.4
    max_seq_len: int = 1024  # rows of the sinusoidal table; longer sequences are refused
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    norm_first: bool = False  # False: post-norm, as in the paper; True: pre-norm
    share_embeddings: bool = True  # §3.4: source emb = target emb = output projection
    norm_eps: float = 1e-5
    use_sdpa: bool = True  # PyTorch's fused attention kernel; False: the explicit maths

    def __post_init__(self):
        if self.d_model % self.n_heads or self.d_model % 2:
            raise UserError(
                f"d_model={self.d_model} must be even and divisible by n_heads={self.n_heads}"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TransformerConfig":
        if name not in PRESETS:
            raise UserError(f"unknown Transformer preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"unknown TransformerConfig field(s): {', '.join(unknown)}")
        return cls(**d)


PRESETS = {
    # tests and a CPU demo that trains in minutes
    "tiny": dict(d_model=64, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=256),
    # what a CPU can train in hours
    "small": dict(d_model=256, n_heads=4, n_encoder_layers=3, n_decoder_layers=3, d_ff=1024),
    # Table 3
    "base": dict(d_model=512, n_heads=8, n_encoder_layers=6, n_decoder_layers=6, d_ff=2048, dropout=0.1),
    "big": dict(d_model=1024, n_heads=16, n_encoder_layers=6, n_decoder_layers=6, d_ff=4096, dropout=0.3),
}


class LayerNorm(nn.Module):
    """Layer normalisation over the last dimension (Ba et al. 2016), the LayerNorm of §3.1:
    y = (x − mean(x)) / √(var(x) + ε) · γ + β."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))  # γ
        self.bias = nn.Parameter(torch.zeros(d_model))  # β
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class KVCache:
    """The keys and values, (B, n_heads, T, head_dim), one attention keeps between decoding steps.

    A self-attention cache grows by the new positions at every step. A static one
    (cross-attention) holds the keys and values of the encoder output, computed on the first step.
    """

    def __init__(self, static: bool = False):
        self.static = static
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key is not None and not self.static:
            key, value = torch.cat([self.key, key], dim=2), torch.cat([self.value, value], dim=2)
        self.key, self.value = key, value
        return key, value

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search moves the cache along with its beams)."""
        if self.key is not None:
            self.key, self.value = self.key.index_select(0, index), self.value.index_select(0, index)


class MultiHeadAttention(nn.Module):
    """Multi-head attention, §3.2.2:

        MultiHead(Q, K, V) = Concat(head_1, …, head_h) W^O,   head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)

    The h projections W_i^Q (d_model × d_k) sit side by side in one d_model × d_model linear
    layer, `q_proj`, and likewise for K and V; `split_heads` cuts its output into the h heads.
    """

    def __init__(self, d_model: int, n_heads: int, use_sdpa: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads  # d_k = d_v = d_model / h
        self.q_proj = nn.Linear(d_model, d_model)  # W^Q
        self.k_proj = nn.Linear(d_model, d_model)  # W^K
        self.v_proj = nn.Linear(d_model, d_model)  # W^V
        self.out_proj = nn.Linear(d_model, d_model)  # W^O
        self.use_sdpa = use_sdpa
        self.record_weights = False  # set True to keep the attention weights in `self.weights`
        self.weights: torch.Tensor | None = None  # (B, n_heads, T_q, T_k), for figures

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)

    def forward(self, x, context, mask=None, is_causal=False, cache: KVCache | None = None):
        """Queries from x (B, T_q, d_model); keys and values from context (B, T_k, d_model), which
        is x itself for self-attention and the encoder output for cross-attention.
        mask: bool, broadcastable to (B, n_heads, T_q, T_k), True where attention is allowed.
        Returns (B, T_q, d_model)."""
        q = self.split_heads(self.q_proj(x))  # (B, n_heads, T_q, head_dim)
        if cache is not None and cache.static and cache.key is not None:
            k, v = cache.key, cache.value  # the encoder output's, projected on the first step
        else:
            k = self.split_heads(self.k_proj(context))  # (B, n_heads, T_k, head_dim)
            v = self.split_heads(self.v_proj(context))
            if cache is not None:
                k, v = cache.update(k, v)  # self-attention: prepend the earlier positions
        out = scaled_dot_product_attention(q, k, v, mask, is_causal, use_sdpa=self.use_sdpa)
        if self.record_weights:
            # softmax(QKᵀ/√d_k) · I is the weight matrix itself, with exactly the same masking.
            eye = torch.eye(k.size(2), dtype=k.dtype, device=k.device).expand(*k.shape[:2], -1, -1)
            self.weights = scaled_dot_product_attention(q, k, eye, mask, is_causal, use_sdpa=False)
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))  # Concat(heads) W^O


class FeedForward(nn.Module):
    """Position-wise feed-forward network, §3.3: FFN(x) = max(0, x W1 + b1) W2 + b2."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(torch.relu(self.w_1(x)))  # (B, T, d_ff) inside


def sinusoidal_positions(n_positions: int, d_model: int) -> torch.Tensor:
    """§3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).
    Returns (n_positions, d_model)."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)
    angles = pos / 10000 ** (two_i / d_model)  # (n_positions, d_model / 2)
    pe = torch.empty(n_positions, d_model, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = angles.sin(), angles.cos()
    return pe.float()


class ResidualLayer(nn.Module):
    """What both layer types share: a residual connection around each sub-layer (§3.1), with
    dropout on the sub-layer's output (§5.4).
        post-norm (the paper):  x ← LayerNorm(x + Dropout(Sublayer(x)))
        pre-norm (norm_first):  x ← x + Dropout(Sublayer(LayerNorm(x)))"""

    def __init__(self, config: TransformerConfig, n_sublayers: int):
        super().__init__()
        self.norms = nn.ModuleList(LayerNorm(config.d_model, config.norm_eps) for _ in range(n_sublayers))
        self.dropout = nn.Dropout(config.dropout)
        self.norm_first = config.norm_first

    def residual(self, x: torch.Tensor, i: int, sublayer) -> torch.Tensor:
        norm = self.norms[i]
        if self.norm_first:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))


class EncoderLayer(ResidualLayer):
    """An encoder layer, §3.1: self-attention over the source, then the FFN."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config, n_sublayers=2)
        self.self_attention = MultiHeadAttention(config.d_model, config.n_heads, config.use_sdpa)
        self.feed_forward = FeedForward(config.d_model, config.d_ff)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, S, d_model); src_mask: (B, 1, 1, S), False at padding. Returns (B, S, d_model)."""
        x = self.residual(x, 0, lambda h: self.self_attention(h, h, mask=src_mask))
        return self.residual(x, 1, self.feed_forward)


class DecoderLayer(ResidualLayer):
    """A decoder layer, §3.1: masked self-attention (position i sees positions ≤ i), attention
    over the encoder output ("encoder-decoder attention", §3.2.3), then the FFN."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config, n_sublayers=3)
        self.self_attention = MultiHeadAttention(config.d_model, config.n_heads, config.use_sdpa)
        self.cross_attention = MultiHeadAttention(config.d_model, config.n_heads, config.use_sdpa)
        self.feed_forward = FeedForward(config.d_model, config.d_ff)

    def forward(self, x, memory, src_mask, self_cache=None, cross_cache=None):
        """x: (B, T, d_model) target positions; memory: (B, S, d_model) encoder output;
        src_mask: (B, 1, 1, S). The caches are this layer's when decoding incrementally.
        Returns (B, T, d_model)."""
        # Right-padded targets need no padding mask: the causal mask already hides every pad
        # from every real position before it.
        x = self.residual(x, 0, lambda h: self.self_attention(h, h, is_causal=True, cache=self_cache))
        x = self.residual(x, 1, lambda h: self.cross_attention(h, memory, mask=src_mask, cache=cross_cache))
        return self.residual(x, 2, self.feed_forward)


class DecoderCache:
    """Everything the decoder keeps between generation steps: each layer's self- and
    cross-attention KVCache, and how many target positions are done (where the next start)."""

    def __init__(self, n_layers: int):
        self.self_attention = [KVCache() for _ in range(n_layers)]
        self.cross_attention = [KVCache(static=True) for _ in range(n_layers)]
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        for cache in self.self_attention + self.cross_attention:
            cache.reorder(index)


class Transformer(nn.Module):
    """The encoder–decoder Transformer, Figure 1 of Vaswani et al. (2017)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.src_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.tgt_embedding = (
            self.src_embedding if config.share_embeddings else nn.Embedding(config.vocab_size, config.d_model)
        )
        # Derived from the config, so not saved in checkpoints.
        self.register_buffer("positions", sinusoidal_positions(config.max_seq_len, config.d_model), persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))
        # Pre-norm leaves each stack's output un-normalised, so each stack ends with a LayerNorm.
        self.encoder_norm = LayerNorm(config.d_model, config.norm_eps) if config.norm_first else None
        self.decoder_norm = LayerNorm(config.d_model, config.norm_eps) if config.norm_first else None
        # The "learned linear transformation" before the softmax, §3.4.
        self.output_projection = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.share_embeddings:
            self.output_projection.weight = self.src_embedding.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weight matrices (as PyTorch's own Transformer module does) and zero biases, then
        embeddings ~ N(0, 1/d_model): × √d_model gives unit variance, and the tied output
        projection starts with logits of about unit variance too."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embedding in (self.src_embedding, self.tgt_embedding):  # after: may be tied to a Linear
            nn.init.normal_(embedding.weight, std=self.config.d_model**-0.5)

    def embed(self, ids: torch.Tensor, embedding: nn.Embedding, start: int = 0) -> torch.Tensor:
        """§3.4–3.5: embedding × √d_model + PE of positions start, start+1, …; then dropout.
        ids (B, T) → (B, T, d_model)."""
        end = start + ids.size(1)
        if end > self.config.max_seq_len:
            raise UserError(
                f"a sequence of {end} positions is longer than max_seq_len={self.config.max_seq_len}; "
                "shorten the input or build the model with a larger max_seq_len"
            )
        x = embedding(ids) * math.sqrt(self.config.d_model) + self.positions[start:end]
        return self.dropout(x)

    def encode(self, src_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src_ids (B, S) → memory (B, S, d_model) and src_mask (B, 1, 1, S), False at padding."""
        src_mask = (src_ids != self.config.pad_id)[:, None, None, :]
        x = self.embed(src_ids, self.src_embedding)
        for layer in self.encoder_layers:
            x = layer(x, src_mask)
        return (x if self.encoder_norm is None else self.encoder_norm(x)), src_mask

    def decode(self, tgt_ids, memory, src_mask, cache: DecoderCache | None = None) -> torch.Tensor:
        """tgt_ids (B, T) → decoder output (B, T, d_model), before the output projection.
        With a cache, tgt_ids are only the new positions after cache.length, and the cache grows."""
        start = 0 if cache is None else cache.length
        x = self.embed(tgt_ids, self.tgt_embedding, start)
        for i, layer in enumerate(self.decoder_layers):
            caches = (None, None) if cache is None else (cache.self_attention[i], cache.cross_attention[i])
            x = layer(x, memory, src_mask, *caches)
        if cache is not None:
            cache.length += tgt_ids.size(1)
        return x if self.decoder_norm is None else self.decoder_norm(x)

    def new_cache(self) -> DecoderCache:
        return DecoderCache(self.config.n_decoder_layers)

    def forward(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor) -> torch.Tensor:
        """src_ids (B, S); tgt_ids (B, T), the decoder input: the target shifted right, starting
        with BOS. Returns logits (B, T, vocab_size) for the next token at each position."""
        memory, src_mask = self.encode(src_ids)
        return self.output_projection(self.decode(tgt_ids, memory, src_mask))

    @torch.no_grad()
    def generate(self, src_ids, max_new_tokens=None, beam_size=1, length_penalty=0.6, use_cache=True):
        """Translate src_ids (B, S): greedy when beam_size == 1, else beam search with the GNMT
        length penalty α = length_penalty (§6.1 uses beam 4, α 0.6). Stops at EOS or after
        max_new_tokens (default: source length + 50, §6.1; at most max_seq_len).
        Returns (B, L): no leading BOS, the EOS when produced, right-padded with pad_id."""
        if beam_size < 1:
            raise UserError(f"beam_size must be at least 1, got {beam_size}")
        if max_new_tokens is None:
            max_new_tokens = int((src_ids != self.config.pad_id).sum(dim=1).max()) + 50
        max_new_tokens = min(max_new_tokens, self.config.max_seq_len)
        was_training = self.training
        self.eval()  # dropout would make generation random (and cached ≠ uncached)
        try:
            if beam_size == 1:
                return greedy_decode(self, src_ids, max_new_tokens, use_cache=use_cache)
            return beam_search(self, src_ids, max_new_tokens, beam_size, length_penalty, use_cache=use_cache)
        finally:
            self.train(was_training)
