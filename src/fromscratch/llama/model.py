"""Llama 2: Touvron et al. (2023), "Llama 2: Open Foundation and Fine-Tuned Chat Models".

§2.2 of the paper: "We adopt most of the pretraining setting and model architecture from
Llama 1. We use the standard transformer architecture (Vaswani et al., 2017), apply
pre-normalization using RMSNorm (Zhang and Sennrich, 2019), use the SwiGLU activation function
(Shazeer, 2020), and rotary positional embeddings (RoPE, Su et al. 2022). The primary
architectural differences from Llama 1 include increased context length and grouped-query
attention (GQA)." (Ainslie et al. 2023; the 34B and 70B models use it.)

The file reads in the order data flows: RMSNorm → RoPE → attention (grouped-query, with the
shared KV cache) → SwiGLU feed-forward → block → model → the next-token loss. The shapes are
`LlamaConfig` (config.py). Module and parameter names are Meta's (`layers.0.attention.wq.weight`,
...), so Meta's `consolidated.*.pth` and llama2.c checkpoints load without renaming;
`checkpoints/` converts Hugging Face ones.

Where the code departs from the paper or from Meta's reference `llama/model.py`:
- RoPE rotates *adjacent* pairs (x₀, x₁), (x₂, x₃), ... as Meta's code does. Hugging Face rotates
  (xᵢ, x_{i+d/2}) instead; the two agree once the rows of wq and wk are permuted, which
  `checkpoints/huggingface.py` does when it converts.
- Weight initialisation (which the paper does not give) follows llama2.c / GPT-2: N(0, 0.02),
  with the two projections that write into the residual stream (wo, w2) scaled by 1/√(2·n_layers).
- Optional dropout on attention weights and residual branches (llama2.c trains its small models
  with it; Llama 2 itself uses none, so the default is 0).
- Ragged batches: `pad_lengths` gives each row's number of left-padding tokens, which are masked
  out and skipped when counting positions, so a padded row computes what it would alone.

This file is plain PyTorch. The CPU fast paths — a packed copy of the weights for decoding, a
cross-entropy that never holds all logits, faster matrix products — are opt-in, in `fast.py`
(`fast.accelerate(model)`), and tested to compute the same thing.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromscratch.blocks import KVCache, scaled_dot_product_attention
from fromscratch.errors import UserError
from fromscratch.llama import checkpoints, generation
from fromscratch.llama.config import LlamaConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019, eq. 4): x / √(mean(x²) + ε) · g.

    LayerNorm without re-centring and without a bias. Computed in float32 whatever the input
    dtype, as Meta's code does: in float16, x² overflows (to ∞) once |x| exceeds 256.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def precompute_rope_rotations(head_dim: int, max_seq_len: int, theta: float = 10000.0,
                              device: torch.device | str | None = None) -> torch.Tensor:
    """e^{i·m·θⱼ} for every position m < max_seq_len and pair j < head_dim/2 (RoFormer §3.2).

    θⱼ = theta^(−2j/head_dim): the first pair turns once per ~6 positions, the last barely moves.
    Returns complex64 (max_seq_len, head_dim/2).
    """
    theta_j = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)  # (head_dim/2,)
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), theta_j)  # m·θⱼ
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x₂ⱼ, x₂ⱼ₊₁) of every head by the angle m·θⱼ of its position m.

    Viewing a pair as the complex number x₂ⱼ + i·x₂ⱼ₊₁, the rotation is a multiplication by
    e^{i·m·θⱼ}, so q·k after rotation depends on positions only through m − n (RoFormer eq. 16).
    x: (B, T, H, head_dim); rotations: (T, head_dim/2) or, per row, (B, T, head_dim/2).
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, head_dim/2)
    rotated = pairs * rotations.unsqueeze(-2)  # broadcast over heads
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv_heads, T, head_dim) → (B, n_kv_heads·n_rep, T, head_dim): with grouped-query
    attention each key/value head serves n_rep consecutive query heads."""
    if n_rep == 1:
        return x
    b, n_kv_heads, t, head_dim = x.shape
    return x[:, :, None].expand(b, n_kv_heads, n_rep, t, head_dim).reshape(b, n_kv_heads * n_rep, t, head_dim)


class Attention(nn.Module):
    """Causal self-attention with RoPE on queries and keys and grouped-query key/value heads."""

    def __init__(self, layer_index: int, config: LlamaConfig):
        super().__init__()
        self.layer_index = layer_index  # which slot of a KVCache is ours
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.dropout, self.use_sdpa = config.dropout, config.use_sdpa
        self.wq = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, T, d_model) → (B, T, d_model). mask: (B, 1, 1, T_k) key padding, or None."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rotations), apply_rope(k, rotations)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, n_kv_heads, T_cached + T, head_dim)
        n_rep = self.n_heads // self.n_kv_heads
        out = scaled_dot_product_attention(
            q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask=mask, is_causal=True,
            dropout_p=self.dropout if self.training else 0.0, use_sdpa=self.use_sdpa,
        )  # (B, n_heads, T, head_dim)
        out = self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        return F.dropout(out, self.dropout, self.training)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020, eq. 6 with Swish₁ = SiLU): w2(silu(w1·x) ⊙ w3·x)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(config.d_model, config.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(config.hidden_dim, config.d_model, bias=False)  # down
        self.w3 = nn.Linear(config.d_model, config.hidden_dim, bias=False)  # up
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return F.dropout(out, self.dropout, self.training)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + Attention(RMSNorm(x)); out = h + FFN(RMSNorm(h))."""

    def __init__(self, layer_index: int, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = Attention(layer_index, config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, rotations, mask, cache=None):
        h = x + self.attention(self.attention_norm(x), rotations, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


def next_token_loss(hidden: torch.Tensor, output: nn.Linear, targets: torch.Tensor,
                    ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """The language-modelling loss: cross-entropy of predicting each next token.

    hidden (B, T, d_model) are the final hidden states at positions 1..T, `output` the classifier,
    targets (B, T) the tokens at positions 2..T+1 (the input shifted left by one); the causal mask
    guarantees position t saw only tokens ≤ t. reduction: "mean" over the targets that are not
    ignore_index, or "sum". `fast.linear_cross_entropy` computes the same without the full logits.
    """
    if reduction not in ("mean", "sum"):
        raise UserError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    logits = output(hidden).float()  # (B, T, vocab_size)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction=reduction)


class Llama(nn.Module):
    """Token embedding → n_layers pre-norm blocks → RMSNorm → linear classifier over the vocab."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(self.make_block(i, config) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # A plain attribute, not a buffer (as in Meta's code): it must stay complex64 when the
        # model is cast to half precision. Made on the CPU even when the model is built on the
        # meta device (as checkpoints/ does); forward() moves it to the input's device.
        self.rope_rotations = precompute_rope_rotations(config.head_dim, config.max_seq_len,
                                                        config.rope_theta, device="cpu")
        # Hooks for the opt-in fast paths (fast.accelerate): the loss of forward(targets=...),
        # a plain function it replaces by one computing the same without the (B, T, vocab)
        # logits; and a faster one-token decoding step for generate (None: forward does it).
        self.next_token_loss = next_token_loss
        self.decode_step = None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def make_block(layer_index: int, config: LlamaConfig) -> nn.Module:
        """Block `layer_index` of the stack; a model built on Llama (the MoE) overrides this."""
        return TransformerBlock(layer_index, config)

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                pad_lengths: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """Next-token logits: (B, T) token ids → (B, T, vocab_size) float32.

        cache: decode incrementally: input_ids are the positions after the `cache.length` already
            cached; they are appended to it.
        pad_lengths: (B,) number of left-padding tokens at the start of each row (ragged batch);
            they are masked out of attention and each row's positions start after its padding.
        targets: (B, T) next tokens; then the loss (`next_token_loss`) is returned instead of the
            logits. Training calls it this way because DDP and FSDP only see forward().
        """
        h = self.hidden_states(input_ids, cache, pad_lengths)
        if targets is not None:
            return self.next_token_loss(h, self.output, targets, reduction=reduction)
        return self.output(h).float()

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Everything but the classifier: (B, T) token ids → (B, T, d_model), after the final norm."""
        t = input_ids.size(1)
        rotations, mask = self.rotations_and_mask(t, cache, pad_lengths, input_ids.device)
        h = self.tok_embeddings(input_ids)  # (B, T, d_model)
        h = F.dropout(h, self.config.dropout, self.training)
        for layer in self.layers:
            h = layer(h, rotations, mask, cache)
        if cache is not None:
            cache.advance(t)
        return self.norm(h)

    def rotations_and_mask(self, t: int, cache: KVCache | None, pad_lengths: torch.Tensor | None,
                           device: torch.device):
        """The RoPE rotations of the next `t` positions (after those in `cache`) and the key
        padding mask: (T, head_dim/2) and None, or per row (B, T, head_dim/2) and (B, 1, 1, T_k).
        Raises UserError when the positions do not fit in max_seq_len or in the cache."""
        start = 0 if cache is None else cache.length
        if start + t > self.config.max_seq_len:
            raise UserError(
                f"sequence of {start + t} tokens is longer than max_seq_len {self.config.max_seq_len}"
            )
        if cache is not None and cache.max_len is not None and start + t > cache.max_len:
            raise UserError(f"sequence of {start + t} tokens overflows a KV cache of {cache.max_len}")
        if self.rope_rotations.device != device:
            with torch.inference_mode(False):  # a normal tensor even if first moved while decoding
                self.rope_rotations = self.rope_rotations.to(device)
        if pad_lengths is None:
            return self.rope_rotations[start:start + t], None
        # Each row counts positions from its first real token. (RoPE scores depend only on
        # m − n, so this changes rounding, not maths: the row then matches its unpadded run.)
        positions = torch.arange(start, start + t, device=device) - pad_lengths[:, None]
        rotations = self.rope_rotations[positions.clamp(min=0)]  # (B, T, head_dim/2)
        is_token = torch.arange(start + t, device=device) >= pad_lengths[:, None]
        return rotations, is_token[:, None, None, :]  # mask (B, 1, 1, T_k): nothing attends to padding

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch_size` rows of up to `max_len` (default max_seq_len)
        positions, allocated now: (B, n_kv_heads, max_len, head_dim) per layer."""
        p = self.tok_embeddings.weight
        cache = KVCache(self.config.n_layers, max_len=max_len or self.config.max_seq_len)
        return cache.allocate(batch_size, self.config.kv_heads, self.config.head_dim, p.dtype, p.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied matrix counts once

    def generate(self, input_ids, max_new_tokens: int, **options):
        """Extend prompts: see `fromscratch.llama.generation.generate`."""
        return generation.generate(self, input_ids, max_new_tokens, **options)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32) -> "Llama":
        """Load a Meta, Hugging Face, llama2.c or fromscratch checkpoint, or a hub name (see checkpoints/)."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
        return checkpoints.build_model(cls, checkpoints.read_checkpoint(path, dtype), dtype)

    def save_pretrained(self, out_dir, tokenizer_path=None):
        """Write config and weights as a Hugging Face directory that `from_pretrained` and
        `transformers.LlamaForCausalLM` load."""
        return checkpoints.save_pretrained(self, out_dir, tokenizer_path=tokenizer_path)
