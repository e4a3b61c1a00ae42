"""The Transformer of Vaswani et al. (2017), "Attention Is All You Need", §3 (Figure 1).

The file follows the paper's order (the hyper-parameters of Table 3 are `TransformerConfig`,
in config.py):
    LayerNorm               §3.1 (Ba et al. 2016), used as LayerNorm(x + Sublayer(x))
    MultiHeadAttention      §3.2.2, over scaled dot-product attention §3.2.1 (fromscratch.blocks)
    FeedForward             §3.3   FFN(x) = max(0, x W1 + b1) W2 + b2
    sinusoidal_positions    §3.5
    EncoderLayer,
    DecoderLayer            §3.1, the two stacks of Figure 1
    Transformer             embeddings × √d_model with tied weights (§3.4), the stacks, the
                            output projection; `generate` (§6.1) is in decoding.py

Where the code departs from, or adds to, the paper:
- `norm_first=True` gives pre-norm layers, x + Dropout(Sublayer(LayerNorm(x))), and a final
  LayerNorm after each stack (Xiong et al. 2020; PyTorch's `norm_first`). Pre-norm trains
  stably without a carefully tuned warm-up. The default is the paper's post-norm.
- Dropout sits only where §5.4 puts it: on each sub-layer's output before the residual add and
  on the embedding + position sums. PyTorch and tensor2tensor also drop attention weights and
  the FFN's hidden units; we do not.
- The paper does not say whether its projections have biases; we keep them, like PyTorch.
- Switches for the published OPUS-MT (Marian) models, all off by default: the FFN's activation
  (Marian uses swish), the sinusoid table's layout (Marian stores the sines of all frequencies
  first, then the cosines), a bias on the output logits, and the decoder's start token (Marian
  starts from the padding token).
- A `DecoderCache` (two `fromscratch.blocks.KVCache`) lets the decoder run one new position at
  a time during generation (an implementation device, not part of the paper).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromscratch.blocks import KVCache, scaled_dot_product_attention
from fromscratch.errors import UserError
from fromscratch.transformer import checkpoints, decoding
from fromscratch.transformer.config import TransformerConfig


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


class MultiHeadAttention(nn.Module):
    """Multi-head attention, §3.2.2:

        MultiHead(Q, K, V) = Concat(head_1, …, head_h) W^O,   head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)

    The h projections W_i^Q (d_model × d_k) sit side by side in one d_model × d_model linear
    layer, `q_proj`, and likewise for K and V; `split_heads` cuts its output into the h heads.
    `layer_index` says which slot of a `KVCache` holds this attention's keys and values.
    """

    def __init__(self, d_model: int, n_heads: int, use_sdpa: bool = True, layer_index: int = 0):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads  # d_k = d_v = d_model / h
        self.layer_index = layer_index
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
        cache: this attention's keys and values of earlier steps (self-attention), or of the
        encoder output once projected (cross-attention, a static cache).
        Returns (B, T_q, d_model)."""
        q = self.split_heads(self.q_proj(x))  # (B, n_heads, T_q, head_dim)
        if cache is not None and cache.static and cache.holds(self.layer_index):
            k, v = cache.keys[self.layer_index], cache.values[self.layer_index]  # projected on step 1
        else:
            k = self.split_heads(self.k_proj(context))  # (B, n_heads, T_k, head_dim)
            v = self.split_heads(self.v_proj(context))
            if cache is not None:
                k, v = cache.update(self.layer_index, k, v)  # self-attention: after the earlier positions
        out = scaled_dot_product_attention(q, k, v, mask, is_causal, use_sdpa=self.use_sdpa)
        if self.record_weights:
            # softmax(QKᵀ/√d_k) · I is the weight matrix itself, with exactly the same masking.
            eye = torch.eye(k.size(2), dtype=k.dtype, device=k.device).expand(*k.shape[:2], -1, -1)
            self.weights = scaled_dot_product_attention(q, k, eye, mask, is_causal, use_sdpa=False)
        b, heads, t, head_dim = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, heads * head_dim))  # Concat(heads) W^O


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x·σ(1.702·x), the sigmoid approximation of GELU that OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATION_FUNCTIONS = {"relu": torch.relu, "swish": F.silu, "gelu": F.gelu, "quick_gelu": quick_gelu}


class FeedForward(nn.Module):
    """Position-wise feed-forward network, §3.3: FFN(x) = max(0, x W1 + b1) W2 + b2.

    `activation` replaces max(0, ·) when asked: swish(u) = u·σ(u) (Marian), GELU (ViT) or
    CLIP's quick GELU."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu"):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.activation = ACTIVATION_FUNCTIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.activation(self.w_1(x)))  # (B, T, d_ff) inside


def sinusoidal_positions(n_positions: int, d_model: int, layout: str = "interleaved") -> torch.Tensor:
    """§3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).

    layout "halves" holds the same numbers with the sines of all frequencies first and then
    the cosines (column i is sin, column d_model/2 + i is cos), as Marian's table is stored.
    Returns (n_positions, d_model)."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)
    angles = pos / 10000 ** (two_i / d_model)  # (n_positions, d_model / 2)
    pe = torch.empty(n_positions, d_model, dtype=torch.float64)
    if layout == "halves":
        pe[:, : d_model // 2], pe[:, d_model // 2 :] = angles.sin(), angles.cos()
    else:
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
    """An encoder layer, §3.1: self-attention over the source, then the FFN.

    With is_causal it is also the layer of a causal text encoder (CLIP's text tower, CoCa's
    unimodal decoder), which can then run incrementally with a KV cache like the decoder."""

    def __init__(self, config: TransformerConfig, layer_index: int = 0):
        super().__init__(config, n_sublayers=2)
        self.self_attention = MultiHeadAttention(config.d_model, config.n_heads, config.use_sdpa, layer_index)
        self.feed_forward = FeedForward(config.d_model, config.d_ff, config.activation)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, S, d_model); src_mask: (B, 1, 1, S), False at padding (None: no padding).
        is_causal: position i attends to positions ≤ i only; cache: the keys and values of the
        positions before x (incremental decoding). Returns (B, S, d_model)."""
        x = self.residual(x, 0, lambda h: self.self_attention(h, h, mask=src_mask, is_causal=is_causal, cache=cache))
        return self.residual(x, 1, self.feed_forward)

    def forward_at(self, x: torch.Tensor, index: torch.Tensor, src_mask: torch.Tensor | None = None,
                   is_causal: bool = False) -> torch.Tensor:
        """`forward(x, src_mask, is_causal)` at one position of each row: x (B, S, d_model),
        index (B,) → (B, 1, d_model). The keys and values still come from every position; the
        query, the residuals and the FFN are computed at that position only. A model that reads
        one position of its last layer (ViT's class token, CLIP's end of text) needs no more of
        it: about 10/12 of that layer's products are saved."""
        rows = torch.arange(x.size(0), device=x.device)
        mask = src_mask
        if is_causal:  # the position sees itself and the positions before it
            seen = torch.arange(x.size(1), device=x.device) <= index[:, None]  # (B, S)
            mask = seen[:, None, None, :] if mask is None else mask & seen[:, None, None, :]
        context = self.norms[0](x) if self.norm_first else x  # what the sub-layer reads at every position
        at = self.residual(x[rows, index][:, None], 0, lambda h: self.self_attention(h, context, mask=mask))
        return self.residual(at, 1, self.feed_forward)  # (B, 1, d_model)


class DecoderLayer(ResidualLayer):
    """A decoder layer, §3.1: masked self-attention (position i sees positions ≤ i), attention
    over the encoder output ("encoder-decoder attention", §3.2.3), then the FFN."""

    def __init__(self, config: TransformerConfig, layer_index: int = 0):
        super().__init__(config, n_sublayers=3)
        self.self_attention = MultiHeadAttention(config.d_model, config.n_heads, config.use_sdpa, layer_index)
        self.cross_attention = MultiHeadAttention(config.d_model, config.n_heads, config.use_sdpa, layer_index)
        self.feed_forward = FeedForward(config.d_model, config.d_ff, config.activation)

    def forward(self, x, memory, src_mask, cache: "DecoderCache | None" = None):
        """x: (B, T, d_model) target positions; memory: (B, S, d_model) encoder output;
        src_mask: (B, 1, 1, S). `cache` holds every decoder layer's keys and values when
        decoding incrementally. Returns (B, T, d_model)."""
        self_cache, cross_cache = (None, None) if cache is None else (cache.self_attention, cache.cross_attention)
        # Right-padded targets need no padding mask: the causal mask already hides every pad
        # from every real position before it.
        x = self.residual(x, 0, lambda h: self.self_attention(h, h, is_causal=True, cache=self_cache))
        x = self.residual(x, 1, lambda h: self.cross_attention(h, memory, mask=src_mask, cache=cross_cache))
        return self.residual(x, 2, self.feed_forward)


@dataclass
class DecoderCache:
    """What the decoder keeps between generation steps: every layer's self-attention keys and
    values (one more position per step) and its cross-attention keys and values of the encoder
    output (projected on the first step, then reused)."""

    self_attention: KVCache
    cross_attention: KVCache

    @property
    def length(self) -> int:
        """Target positions decoded so far: where the next one starts."""
        return self.self_attention.length

    def reorder(self, rows: torch.Tensor, context_rows: torch.Tensor | None = None) -> None:
        """Keep rows `rows` of the self-attention's keys and values, and rows `context_rows` of
        the encoder output's (None: they stay, as when beams move within their source)."""
        self.self_attention.reorder(rows)
        if context_rows is not None:
            self.cross_attention.reorder(context_rows)


def next_token_loss(hidden: torch.Tensor, output_projection: nn.Linear, logits_bias: torch.Tensor | None,
                    targets: torch.Tensor, ignore_index: int, label_smoothing: float = 0.0,
                    reduction: str = "sum") -> torch.Tensor:
    """The training loss of §5.4: cross-entropy of each next target token, label-smoothed with
    ε_ls spread over the whole vocabulary (PyTorch's convention), padding ignored.

    hidden (B, T, d_model) is the decoder output, targets (B, T) the tokens it must predict.
    `fast.fused_next_token_loss` computes the same without the (B, T, vocab) logits."""
    logits = output_projection(hidden)
    if logits_bias is not None:
        logits = logits + logits_bias
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)


class Transformer(nn.Module):
    """The encoder–decoder Transformer, Figure 1 of Vaswani et al. (2017)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.src_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.tgt_embedding = (
            self.src_embedding if config.share_embeddings else nn.Embedding(config.vocab_size, config.d_model)
        )
        # Derived from the config, so not saved in checkpoints; made on the CPU even when the
        # model is built on the meta device (as checkpoints.py does to load weights).
        with torch.device("cpu"):
            table = sinusoidal_positions(config.max_seq_len, config.d_model, config.positions)
        self.register_buffer("positions", table, persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_decoder_layers))
        # Pre-norm leaves each stack's output un-normalised, so each stack ends with a LayerNorm.
        self.encoder_norm = LayerNorm(config.d_model, config.norm_eps) if config.norm_first else None
        self.decoder_norm = LayerNorm(config.d_model, config.norm_eps) if config.norm_first else None
        # The "learned linear transformation" before the softmax, §3.4.
        self.output_projection = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.share_embeddings:
            self.output_projection.weight = self.src_embedding.weight
        # Marian adds a learned bias to the logits; the paper has none.
        self.logits_bias = nn.Parameter(torch.zeros(config.vocab_size)) if config.logits_bias else None
        # Hooks for the opt-in fast paths (fast.accelerate): the loss of forward(targets=...), a
        # plain function it replaces by one computing the same without the (B, T, vocab) logits;
        # the whole of forward(targets=...), which it computes on the real (non-padding)
        # positions only (unset, or returning None: encode, decode, next_token_loss); and a
        # faster one-token decoding step for generate (None: decode() does it).
        self.next_token_loss = next_token_loss
        self.teacher_forced_loss = None
        self.decode_step = None
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
        scale = math.sqrt(self.config.d_model) if self.config.scale_embeddings else 1.0
        x = embedding(ids) * scale + self.positions[start:end]
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
        for layer in self.decoder_layers:
            x = layer(x, memory, src_mask, cache)
        if cache is not None:
            cache.self_attention.advance(tgt_ids.size(1))
        return x if self.decoder_norm is None else self.decoder_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder output (…, d_model) → next-token logits (…, vocab_size), §3.4."""
        logits = self.output_projection(hidden)
        return logits if self.logits_bias is None else logits + self.logits_bias

    def new_cache(self, max_len: int | None = None) -> DecoderCache:
        """An empty cache for incremental decoding: preallocated for `max_len` target positions,
        or growing when None."""
        n_layers = self.config.n_decoder_layers
        return DecoderCache(KVCache(n_layers, max_len=max_len), KVCache(n_layers, static=True))

    def forward(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor, targets: torch.Tensor | None = None,
                label_smoothing: float = 0.0) -> torch.Tensor:
        """src_ids (B, S); tgt_ids (B, T), the decoder input: the target shifted right, starting
        with the start token (BOS). Returns logits (B, T, vocab_size) for the next token at each
        position; or, given the targets (B, T), the label-smoothed cross-entropy summed over the
        non-padding targets (§5.4; training calls it this way because DDP only sees forward)."""
        if targets is not None and self.teacher_forced_loss is not None:
            loss = self.teacher_forced_loss(self, src_ids, tgt_ids, targets, label_smoothing)
            if loss is not None:  # None: nothing to gain on this batch, the route below takes it
                return loss
        memory, src_mask = self.encode(src_ids)
        hidden = self.decode(tgt_ids, memory, src_mask)
        if targets is not None:
            return self.next_token_loss(hidden, self.output_projection, self.logits_bias, targets,
                                        self.config.pad_id, label_smoothing)
        return self.logits(hidden)

    def generate(self, src_ids: torch.Tensor, max_new_tokens: int | None = None, beam_size: int = 1,
                 length_penalty: float = 0.6, use_cache: bool = True, **sampling) -> torch.Tensor:
        """Translate src_ids (B, S): see `fromscratch.transformer.decoding.generate`."""
        return decoding.generate(self, src_ids, max_new_tokens, beam_size, length_penalty, use_cache, **sampling)

    @classmethod
    def from_pretrained(cls, path, device: str = "cpu", average: int | None = None) -> "Transformer":
        """A Transformer from a `translate train` run, a Hugging Face Marian (OPUS-MT) directory,
        or a hub name (see checkpoints.py)."""
        return checkpoints.load_model(cls, path, device, average)

    def save_pretrained(self, out_dir, tokenizer_dir=None):
        """Write a Hugging Face Marian directory that `MarianMTModel.from_pretrained` loads, with
        the Marian tokenizer files of `tokenizer_dir` (e.g. the directory the model came from)."""
        return checkpoints.save_marian(self, out_dir, tokenizer_dir)
