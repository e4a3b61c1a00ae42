"""The VLM's hyper-parameters (a CoCa of our size: Yu et al. 2022), with named presets.

The fields are flat (one JSON object in model_config.json); `vision_config`, `text_block_config`
and `multimodal_block_config` give the configs of the parts, which are the ViT's and the
Transformer's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from fromscratch.config import ModelConfig
from fromscratch.errors import UserError
from fromscratch.transformer.config import TransformerConfig
from fromscratch.vlm.vit import ViTConfig


@dataclass
class VLMConfig(ModelConfig):
    # the image encoder (a ViT)
    image_size: int = 64
    patch_size: int = 8
    n_channels: int = 3
    vision_d_model: int = 128
    vision_n_layers: int = 4
    vision_n_heads: int = 4
    vision_d_ff: int = 512
    # the text decoder: unimodal layers (causal self-attention only), then multimodal ones
    # (causal self-attention, cross-attention to the image, FFN)
    vocab_size: int = 1000
    max_text_len: int = 64  # positions of the text, question and answer together
    d_model: int = 128
    n_heads: int = 4
    n_unimodal_layers: int = 2
    n_multimodal_layers: int = 2
    d_ff: int = 512
    # the joint embedding space
    embed_dim: int = 128
    # CoCa's objective, L = λ_con·L_con + λ_cap·L_cap (§3.2; the paper's weights)
    contrastive_loss_weight: float = 1.0
    caption_loss_weight: float = 2.0
    dropout: float = 0.0
    norm_eps: float = 1e-5
    # token ids (the WordTokenizer's)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3
    sep_id: int = 4  # between a question and its answer
    use_sdpa: bool = True

    PRESETS = {
        # tests: a few seconds of training
        "tiny": dict(image_size=32, patch_size=8, vision_d_model=32, vision_n_layers=1, vision_n_heads=2,
                     vision_d_ff=64, d_model=32, n_heads=2, n_unimodal_layers=1, n_multimodal_layers=1, d_ff=64,
                     embed_dim=32, max_text_len=48),
        # the demo: a minute or two on a CPU
        "demo": dict(image_size=48, patch_size=8, vision_d_model=64, vision_n_layers=2, vision_n_heads=4,
                     vision_d_ff=256, d_model=64, n_heads=4, n_unimodal_layers=1, n_multimodal_layers=2, d_ff=256,
                     embed_dim=64),
        # easy-VQA and the scenes: 64×64 images in 8×8 patches
        "small": dict(image_size=64, patch_size=8, vision_d_model=128, vision_n_layers=4, vision_n_heads=4,
                      vision_d_ff=512, d_model=128, n_heads=4, n_unimodal_layers=1, n_multimodal_layers=2,
                      d_ff=512, embed_dim=128),
        # VQA-RAD: 96×96 radiographs in 12×12 patches, longer questions and answers
        "rad": dict(image_size=96, patch_size=12, vision_d_model=128, vision_n_layers=4, vision_n_heads=4,
                    vision_d_ff=512, d_model=128, n_heads=4, n_unimodal_layers=1, n_multimodal_layers=2,
                    d_ff=512, embed_dim=128, max_text_len=96, dropout=0.1),
    }

    def validate(self) -> None:
        self.vision_config()  # the ViT's own checks
        self.text_block_config()  # the Transformer's (ids within the vocabulary, heads dividing d_model)
        for name in ("unk_id", "sep_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise UserError(f"{name}={getattr(self, name)} is not a token of a {self.vocab_size}-token vocabulary")
        if self.n_multimodal_layers < 1:
            raise UserError("the VLM needs at least one multimodal (cross-attention) layer")
        for name in ("contrastive_loss_weight", "caption_loss_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be ≥ 0, got {getattr(self, name)}")

    @property
    def start_id(self) -> int:
        """The token every text starts with."""
        return self.bos_id

    @property
    def n_text_layers(self) -> int:
        """Unimodal + multimodal layers: the slots of a decoding KV cache."""
        return self.n_unimodal_layers + self.n_multimodal_layers

    def vision_config(self) -> ViTConfig:
        return ViTConfig(image_size=self.image_size, patch_size=self.patch_size, n_channels=self.n_channels,
                         d_model=self.vision_d_model, n_layers=self.vision_n_layers, n_heads=self.vision_n_heads,
                         d_ff=self.vision_d_ff, dropout=self.dropout, norm_eps=self.norm_eps, activation="gelu",
                         use_sdpa=self.use_sdpa)

    def text_block_config(self) -> TransformerConfig:
        """The Transformer config of the text decoder's layers: pre-norm, GELU."""
        return TransformerConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_heads=self.n_heads,
                                 d_ff=self.d_ff, dropout=self.dropout, max_seq_len=self.max_text_len,
                                 norm_first=True, norm_eps=self.norm_eps, activation="gelu", use_sdpa=self.use_sdpa,
                                 pad_id=self.pad_id, bos_id=self.bos_id, eos_id=self.eos_id)
