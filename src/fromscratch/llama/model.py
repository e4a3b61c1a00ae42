"""Llama 2: Touvron et al. (2023), "Llama 2: Open Foundation and Fine-Tuned Chat Models".

§2.2 of the paper: "We adopt most of the pretraining setting and model architecture from
Llama 1. We use the standard transformer architecture (Vaswani et al., 2017), apply
pre-normalization using RMSNorm (Zhang and Sennrich, 2019), use the SwiGLU activation function
(Shazeer, 2020), and rotary positional embeddings (RoPE, Su et al. 2022). The primary
architectural differences from Llama 1 include increased context length and grouped-query
attention (GQA)." (Ainslie et al. 2023; the 34B and 70B models use it.)

The file reads in the order data flows: config → RMSNorm → RoPE → attention (with its KV cache)
→ SwiGLU feed-forward → block → model. Module and parameter names are Meta's
(`layers.0.attention.wq.weight`, ...), so Meta's `consolidated.*.pth` and llama2.c checkpoints
load without renaming; `checkpoints.py` converts Hugging Face ones.

Where the code departs from the paper or from Meta's reference `llama/model.py`:
- RoPE rotates *adjacent* pairs (x₀, x₁), (x₂, x₃), ... as Meta's code does. Hugging Face rotates
  (xᵢ, x_{i+d/2}) instead; the two agree once the rows of wq and wk are permuted, which
  `checkpoints.py` does when it converts.
- Weight initialisation (which the paper does not give) follows llama2.c / GPT-2: N(0, 0.02),
  with the two projections that write into the residual stream (wo, w2) scaled by 1/√(2·n_layers).
- Optional dropout on attention weights and residual branches (llama2.c trains its small models
  with it; Llama 2 itself uses none, so the default is 0).
- Ragged batches: `pad_lengths` gives each row's number of left-padding tokens, which are masked
  out and skipped when counting positions, so a padded row computes what it would alone.
- `Llama.loss` computes the cross-entropy a chunk of positions at a time without ever holding
  all the logits (`linear_cross_entropy`, at the end of this file): same result, less memory
  and time.
- The projections are `fromscratch.gemm.Linear`: nn.Linear, with the products of a CPU training
  step taken from whichever of PyTorch's two matrix libraries is faster for each (same maths).
  Decoding on a CPU runs the blocks below on a re-laid-out copy of the weights (`decode.py`).
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromscratch.errors import UserError
from fromscratch.gemm import Linear, matmul_transposed, use_onednn
from fromscratch.transformer.attention import scaled_dot_product_attention


@dataclass
class LlamaConfig:
    """Shapes of a Llama model; the field names follow Meta's `ModelArgs` where they can."""

    vocab_size: int = 32000
    d_model: int = 4096  # `dim` in Meta's ModelArgs
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None → n_heads (multi-head); 1 → multi-query; between → grouped
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None  # explicit hidden size (llama2.c stores it directly)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False  # output.weight is tok_embeddings.weight (llama2.c models)
    dropout: float = 0.0
    use_sdpa: bool = True  # PyTorch's fused attention; False runs the explicit maths

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise UserError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise UserError(f"head_dim (d_model / n_heads = {self.head_dim}) must be even for RoPE")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise UserError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of the usual 4·d_model keeps the parameter count of a 4·d_model MLP
        (three matrices instead of two), then Meta's multiplier and rounding."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.d_model / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LlamaConfig":
        if name not in PRESETS:
            raise UserError(f"unknown Llama preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**asdict(PRESETS[name]), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(
                f"unknown LlamaConfig field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**d)


PRESETS: dict[str, LlamaConfig] = {
    # For tests and CPU demos.
    "tiny": LlamaConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        multiple_of=16, max_seq_len=256),
    "small": LlamaConfig(vocab_size=32000, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4,
                         multiple_of=32, max_seq_len=512),
    # Karpathy's llama2.c TinyStories models (shared classifier, hidden size from multiple_of).
    "stories260k": LlamaConfig(vocab_size=512, d_model=64, n_layers=5, n_heads=8, n_kv_heads=4,
                               multiple_of=4, max_seq_len=512, tie_embeddings=True),
    "stories15m": LlamaConfig(vocab_size=32000, d_model=288, n_layers=6, n_heads=6,
                              multiple_of=32, max_seq_len=256, tie_embeddings=True),
    "stories42m": LlamaConfig(vocab_size=32000, d_model=512, n_layers=8, n_heads=8,
                              multiple_of=32, max_seq_len=1024, tie_embeddings=True),
    "stories110m": LlamaConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12,
                               multiple_of=32, max_seq_len=1024, tie_embeddings=True),
    # The paper's sizes (Table 1: 4k context; GQA for 70B).
    "7b": LlamaConfig(d_model=4096, n_layers=32, n_heads=32, max_seq_len=4096),
    "13b": LlamaConfig(d_model=5120, n_layers=40, n_heads=40, max_seq_len=4096),
    "70b": LlamaConfig(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       ffn_dim_multiplier=1.3, multiple_of=4096, max_seq_len=4096),
}


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019, eq. 4): x / √(mean(x²) + ε) · g.

    LayerNorm without re-centring and without a bias. Computed in float32 whatever the input
    dtype, as Meta's code does, because the mean of squares underflows in half precision.
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


class KVCache:
    """Keys and values of the positions decoded so far, preallocated for `max_len` positions.

    One (B, n_kv_heads, max_len, head_dim) tensor each for keys and values per layer: sized by the
    number of *key/value* heads, which is where grouped- and multi-query attention save memory
    (n_heads / n_kv_heads times less than multi-head attention).
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, config.kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled; the model advances it after each forward

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """Store this step's (B, n_kv_heads, T, head_dim) keys/values after the cached ones and
        return all of them so far: (B, n_kv_heads, length + T, head_dim) views, no copy."""
        t = keys.size(2)
        self.keys[layer].narrow(2, self.length, t).copy_(keys)
        self.values[layer].narrow(2, self.length, t).copy_(values)
        return self.keys[layer].narrow(2, 0, self.length + t), self.values[layer].narrow(2, 0, self.length + t)


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
        self.wq = Linear(config.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = Linear(self.n_heads * self.head_dim, config.d_model, bias=False)

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
        self.w1 = Linear(config.d_model, config.hidden_dim, bias=False)  # gate
        self.w2 = Linear(config.hidden_dim, config.d_model, bias=False)  # down
        self.w3 = Linear(config.d_model, config.hidden_dim, bias=False)  # up
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


class Llama(nn.Module):
    """Token embedding → n_layers pre-norm blocks → RMSNorm → linear classifier over the vocab."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(TransformerBlock(i, config) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.output = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # A plain attribute, not a buffer (as in Meta's code): it must stay complex64 when the
        # model is cast to half precision. Made on the CPU even when the model is built on the
        # meta device (as checkpoints.py does); forward() moves it to the input's device.
        self.rope_rotations = precompute_rope_rotations(config.head_dim, config.max_seq_len,
                                                        config.rope_theta, device="cpu")
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

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
        targets: (B, T) next tokens; then the cross-entropy is returned instead of the logits
            (see `loss`). Training calls it this way because DDP and FSDP only see forward().
        """
        if targets is not None:
            return self.loss(input_ids, targets, reduction=reduction)
        return self.output(self.hidden_states(input_ids, cache, pad_lengths)).float()

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
            cache.length += t
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
        if cache is not None and start + t > cache.max_len:
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

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of predicting `targets` (B, T) from `input_ids` (B, T): the same value
        and gradients as F.cross_entropy(self(input_ids).flatten(0, 1), targets.flatten()), but
        without ever holding the (B, T, vocab_size) logits (see `linear_cross_entropy`).
        reduction: "mean" over the targets that are not ignore_index, or "sum"."""
        h = self.hidden_states(input_ids)
        return linear_cross_entropy(h.flatten(0, 1), self.output.weight, targets.flatten(),
                                    ignore_index=ignore_index, reduction=reduction)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch_size` rows of up to `max_len` (default max_seq_len) positions."""
        p = self.tok_embeddings.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len, p.dtype, p.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied matrix counts once

    def generate(self, input_ids, max_new_tokens: int, **kwargs):
        """See `fromscratch.llama.generate.generate`."""
        from fromscratch.llama.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    @classmethod
    def from_pretrained(cls, path) -> "Llama":
        """Load a Meta, Hugging Face, llama2.c or fromscratch checkpoint (see checkpoints.py)."""
        from fromscratch.llama.checkpoints import load_pretrained

        return load_pretrained(path)

    def save_pretrained(self, out_dir, tokenizer_path=None):
        """Write config and weights to `out_dir` so `from_pretrained(out_dir)` restores them."""
        from fromscratch.llama.checkpoints import save_pretrained

        return save_pretrained(self, out_dir, tokenizer_path=tokenizer_path)


# --- training loss --------------------------------------------------------------------------------


class _LinearCrossEntropy(torch.autograd.Function):
    """Σᵢ −log softmax(hᵢ·Wᵀ)[targetᵢ] over the rows of h, a chunk of rows at a time.

    The loss is the end of the graph, so its gradient with respect to the logits is known in
    the forward pass: softmax(logits) − onehot(target). Forward therefore turns each chunk's
    probabilities into that gradient in place, takes the two products that need it
    (∂h = g·W and ∂W += gᵀ·h), and drops it: the (rows, vocab) logits never exist whole.
    Backward only scales the stored gradients by the incoming one.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, chunk_rows: int, onednn: bool):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.to(h.dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if needs_grad else None
        grad_weight = torch.empty_like(weight, dtype=torch.float32) if needs_grad else None
        # One (chunk_rows, vocab) buffer serves every chunk: a fresh one each time would cost page
        # faults on every chunk (each is tens of MB).
        rows_per_chunk = min(chunk_rows, h.size(0))
        probs_buffer = torch.empty(rows_per_chunk, w.size(0), dtype=torch.float32, device=h.device)
        for start in range(0, h.size(0), chunk_rows):
            h_chunk, t_chunk = h[start:start + chunk_rows], targets[start:start + chunk_rows]
            n = len(t_chunk)
            keep = t_chunk != ignore_index
            t_safe = t_chunk.masked_fill(~keep, 0)
            rows = torch.arange(n, device=h.device)
            logits = matmul_transposed(h_chunk, w, onednn).float()  # (rows, vocab)
            probs = torch.softmax(logits, dim=-1, out=probs_buffer[:n])
            total += (token_losses(logits, probs, rows, t_safe) * keep).sum()
            if needs_grad:
                grad = probs  # becomes softmax − onehot, in place
                grad[rows, t_safe] -= 1.0
                if not keep.all():
                    grad[~keep] = 0.0
                grad = grad.to(h.dtype)
                grad_h[start:start + chunk_rows] = matmul_transposed(grad, w.t(), onednn)  # g·W
                if start == 0:  # the first chunk's product initialises ∂W
                    torch.mm(grad.t().float(), h_chunk.float(), out=grad_weight)
                else:
                    grad_weight.addmm_(grad.t().float(), h_chunk.float())
        ctx.save_for_backward(grad_h, grad_weight.to(weight.dtype) if needs_grad else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_weight = ctx.saved_tensors
        return grad_h * grad_total, grad_weight * grad_total, None, None, None, None


def token_losses(logits: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    """−log p(target) of each row, from its softmax: one pass over the logits fewer than
    log_softmax followed by exp. Where p(target) underflows float32 (a loss above ~69), the loss
    is taken exactly from the logits instead: logsumexp(z) − z_target."""
    p_target = probs[rows, targets]
    losses = -torch.log(p_target)
    tiny = p_target < 1e-30
    if tiny.any():
        exact = torch.logsumexp(logits[tiny], dim=-1) - logits[rows[tiny], targets[tiny]]
        losses = losses.masked_scatter(tiny, exact)
    return losses


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean",
                         chunk_rows: int | None = None) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets) for h (N, d), weight (vocab, d), targets (N,),
    computed a chunk of rows at a time so the (N, vocab) logits are never held whole.

    With Llama 2's 32k vocabulary the logits are the largest tensor of a training step
    (8 × 256 tokens: 262 MB in float32, plus as much again for their gradient); skipping them
    saves that memory and the passes over it. chunk_rows defaults to ~8M logits per chunk.
    """
    if reduction not in ("mean", "sum"):
        raise UserError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    chunk_rows = chunk_rows or max(1, 2**23 // weight.size(0))
    total = _LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk_rows, use_onednn(h, weight))
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)
