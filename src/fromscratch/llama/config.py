"""The shapes of a Llama model, with presets for the paper's sizes and llama2.c's small models.

Field names follow Meta's `ModelArgs` where they can (`d_model` is its `dim`).
"""

import math
from dataclasses import dataclass

from fromscratch.config import ModelConfig
from fromscratch.errors import UserError


@dataclass
class LlamaConfig(ModelConfig):
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

    PRESETS = {
        # For tests and CPU demos.
        "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                     max_seq_len=256),
        "small": dict(vocab_size=32000, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=32,
                      max_seq_len=512),
        # Karpathy's llama2.c TinyStories models (shared classifier, hidden size from multiple_of).
        "stories260k": dict(vocab_size=512, d_model=64, n_layers=5, n_heads=8, n_kv_heads=4, multiple_of=4,
                            max_seq_len=512, tie_embeddings=True),
        "stories15m": dict(vocab_size=32000, d_model=288, n_layers=6, n_heads=6, multiple_of=32,
                           max_seq_len=256, tie_embeddings=True),
        "stories42m": dict(vocab_size=32000, d_model=512, n_layers=8, n_heads=8, multiple_of=32,
                           max_seq_len=1024, tie_embeddings=True),
        "stories110m": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, multiple_of=32,
                            max_seq_len=1024, tie_embeddings=True),
        # The paper's sizes (Table 1: 4k context; GQA for 70B).
        "7b": dict(d_model=4096, n_layers=32, n_heads=32, max_seq_len=4096),
        "13b": dict(d_model=5120, n_layers=40, n_heads=40, max_seq_len=4096),
        "70b": dict(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                    multiple_of=4096, max_seq_len=4096),
    }

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "multiple_of", "max_seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise UserError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise UserError(f"head_dim (d_model / n_heads = {self.head_dim}) must be even for RoPE")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise UserError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if self.ffn_hidden_dim is not None and self.ffn_hidden_dim < 1:
            raise UserError(f"ffn_hidden_dim must be at least 1, got {self.ffn_hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise UserError(f"norm_eps and rope_theta must be positive, got {self.norm_eps}, {self.rope_theta}")

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
