"""The Transformer's hyper-parameters: Table 3 of Vaswani et al. (2017), with named presets.

The fields after `norm_first` are switches the paper does not have, which the published OPUS-MT
(Marian) translation models need; their defaults are the paper's model. Each is documented
where it is used in `model.py`.
"""

from dataclasses import dataclass

from fromscratch.config import ModelConfig
from fromscratch.errors import UserError

ACTIVATIONS = ("relu", "swish", "gelu", "quick_gelu")
POSITION_LAYOUTS = ("interleaved", "halves")


@dataclass
class TransformerConfig(ModelConfig):
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
    # --- beyond the paper (OPUS-MT / Marian) ---
    activation: str = "relu"  # the FFN's non-linearity: relu (§3.3), swish (Marian), gelu, quick_gelu (CLIP)
    positions: str = "interleaved"  # sinusoid table: sin/cos interleaved (§3.5) or "halves" (Marian)
    scale_embeddings: bool = True  # multiply embeddings by √d_model (§3.4)
    logits_bias: bool = False  # a learned bias added to the output logits (Marian's final_logits_bias)
    decoder_start_id: int | None = None  # the decoder's first input token; None: bos_id (Marian: pad)

    PRESETS = {
        # tests and a CPU demo that trains in minutes
        "tiny": dict(d_model=64, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=256),
        # what a CPU can train in hours
        "small": dict(d_model=256, n_heads=4, n_encoder_layers=3, n_decoder_layers=3, d_ff=1024),
        # `small` at three quarters of its width: 1.5x small's tokens/s (README; the CPU recipe's before `slim`)
        "narrow": dict(d_model=192, n_heads=4, n_encoder_layers=3, n_decoder_layers=3, d_ff=768),
        # `small` at half its width: the CPU recipe's, 1.6-1.8x narrow's steps in the hour (README)
        "slim": dict(d_model=128, n_heads=4, n_encoder_layers=3, n_decoder_layers=3, d_ff=512),
        # Table 3
        "base": dict(d_model=512, n_heads=8, n_encoder_layers=6, n_decoder_layers=6, d_ff=2048, dropout=0.1),
        "big": dict(d_model=1024, n_heads=16, n_encoder_layers=6, n_decoder_layers=6, d_ff=4096, dropout=0.3),
    }

    def validate(self) -> None:
        if self.d_model % self.n_heads or self.d_model % 2:
            raise UserError(f"d_model={self.d_model} must be even and divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if self.positions not in POSITION_LAYOUTS:
            raise UserError(f"positions {self.positions!r}: choose one of {', '.join(POSITION_LAYOUTS)}")
        for name in ("vocab_size", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id,
               "decoder_start_id": self.start_id}
        for name, token in ids.items():
            if not 0 <= token < self.vocab_size:
                raise UserError(f"{name}={token} is not a token of a {self.vocab_size}-token vocabulary")

    @property
    def start_id(self) -> int:
        """The token the decoder's input starts with (§3.1: the output shifted right)."""
        return self.bos_id if self.decoder_start_id is None else self.decoder_start_id
