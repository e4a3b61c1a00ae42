"""The Vision Transformer of Dosovitskiy et al. (2021), "An Image is Worth 16x16 Words", §3.1.

An image x ∈ R^(H×W×C) is cut into N = HW/P² patches x_p ∈ R^(N×(P²·C)), each flattened and
mapped by one matrix E to d_model; a learned [class] token is put in front and learned position
embeddings are added (eq. 1). A stack of pre-norm Transformer encoder layers follows (eq. 2–3);
the output is normalised once more (eq. 4):

    z₀ = [x_class; x_p¹E; …; x_pᴺE] + E_pos        eq. 1    ViT.embed (patchify, patch_embedding)
    z'ℓ = MSA(LN(zℓ₋₁)) + zℓ₋₁                     eq. 2    the Transformer's EncoderLayer with
    zℓ = MLP(LN(z'ℓ)) + z'ℓ                        eq. 3    norm_first=True and a GELU MLP
    y = LN(z_L)                                    eq. 4    ViT.norm

The encoder layers are the Transformer's own (`fromscratch.transformer.model.EncoderLayer`,
`ViTConfig.block_config`), not a copy.

Where the code departs from, or adds to, the paper:
- eq. 4 normalises the class token only; we normalise every token (as Hugging Face's
  `ViTModel.last_hidden_state` does), so that the patch tokens are ready for a decoder to attend
  to. Row 0 is the paper's y.
- Other image sizes (§3.2, "Fine-tuning and higher resolution"): the grid of patch position
  embeddings is resized by bicubic interpolation, exactly as Hugging Face's
  `interpolate_pos_encoding` does; the class token's embedding is kept.
- Two switches for CLIP's image tower (Radford et al. 2021): `pre_norm`, a LayerNorm on the
  embeddings before the first layer, and `patch_bias=False`, a patch projection without bias.
- No classification head: the VLM and CLIP need the representation. `ViT.from_pretrained` reads
  a Hugging Face `ViTModel` or `ViTForImageClassification` directory and leaves the pooler and
  the classifier aside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromscratch.config import ModelConfig
from fromscratch.errors import UserError
from fromscratch.transformer.config import ACTIVATIONS, TransformerConfig
from fromscratch.transformer.model import EncoderLayer, LayerNorm


@dataclass
class ViTConfig(ModelConfig):
    image_size: int = 224  # H = W of the images the position embeddings were learnt for
    patch_size: int = 16  # P
    n_channels: int = 3  # C
    d_model: int = 768  # D in §3.1
    n_layers: int = 12  # L
    n_heads: int = 12
    d_ff: int = 3072  # the MLP's hidden width
    dropout: float = 0.0
    norm_eps: float = 1e-12  # Hugging Face's ViT; CLIP uses 1e-5
    activation: str = "gelu"  # CLIP: quick_gelu
    patch_bias: bool = True  # CLIP's patch projection has none
    pre_norm: bool = False  # CLIP's LayerNorm on the embeddings before the first layer
    use_sdpa: bool = True

    PRESETS = {
        # Table 1 of the paper, and DeiT's smaller widths (Touvron et al. 2021)
        "tiny": dict(d_model=192, n_layers=12, n_heads=3, d_ff=768),
        "small": dict(d_model=384, n_layers=12, n_heads=6, d_ff=1536),
        "base": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072),
        "large": dict(d_model=1024, n_layers=24, n_heads=16, d_ff=4096),
    }

    def validate(self) -> None:
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise UserError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.d_model % self.n_heads:
            raise UserError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        for name in ("n_channels", "n_layers", "n_heads", "d_ff"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def grid_size(self) -> int:
        """Patches per side at `image_size`."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid_size**2

    def block_config(self) -> TransformerConfig:
        """The Transformer's config for these encoder layers: pre-norm (eq. 2–3), this MLP."""
        return TransformerConfig(d_model=self.d_model, n_heads=self.n_heads, d_ff=self.d_ff, dropout=self.dropout,
                                 norm_first=True, norm_eps=self.norm_eps, activation=self.activation,
                                 use_sdpa=self.use_sdpa)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, N, C·P·P): the P×P patches in row-major order over the grid, each
    flattened channel first, then row, then column (the layout of a Conv2d kernel, so that
    patchify + Linear is the strided convolution of `test_patchify_and_linear_is_a_strided_convolution`)."""
    b, c, h, w = images.shape
    p = patch_size
    patches = images.unfold(2, p, p).unfold(3, p, p)  # (B, C, H/P, W/P, P, P)
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(b, (h // p) * (w // p), c * p * p)


def resize_position_grid(positions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch position embeddings (n·n, D) learnt on an n×n grid → (gh·gw, D) for a gh×gw grid, by
    bicubic interpolation of the 2-D grid (what Hugging Face's interpolate_pos_encoding does)."""
    n = int(round(positions.size(0) ** 0.5))
    d = positions.size(1)
    table = positions.reshape(1, n, n, d).permute(0, 3, 1, 2)  # (1, D, n, n)
    table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], d)


class ViT(nn.Module):
    """The Vision Transformer encoder: images (B, C, H, W) → every token's final state (B, 1 + N, D)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        p, d = config.patch_size, config.d_model
        self.patch_embedding = nn.Linear(config.n_channels * p * p, d, bias=config.patch_bias)  # E
        self.cls_token = nn.Parameter(torch.zeros(d))  # x_class
        self.position_embedding = nn.Parameter(torch.zeros(1 + config.n_patches, d))  # E_pos
        self.dropout = nn.Dropout(config.dropout)
        self.pre_norm = LayerNorm(d, config.norm_eps) if config.pre_norm else None
        block = config.block_config()
        self.layers = nn.ModuleList(EncoderLayer(block) for _ in range(config.n_layers))
        self.norm = LayerNorm(d, config.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated normal N(0, 0.02²) weights and embeddings, zero biases (as timm and Hugging Face)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """E_pos for a gh×gw grid of patches, (1 + gh·gw, D): the learnt table, or its patch part
        resized (`resize_position_grid`) when the grid is not the one it was learnt on."""
        n = self.config.grid_size
        if grid == (n, n):
            return self.position_embedding
        patches = resize_position_grid(self.position_embedding[1:], grid)
        return torch.cat([self.position_embedding[:1], patches])

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Eq. 1: (B, C, H, W) → z₀ (B, 1 + N, D)."""
        b, c, h, w = pixel_values.shape
        if c != self.config.n_channels:
            raise UserError(f"the ViT reads {self.config.n_channels}-channel images, got {c} channels")
        p = self.config.patch_size
        if h < p or w < p:
            raise UserError(f"a {h}×{w} image is smaller than one {p}×{p} patch")
        patches = self.patch_embedding(patchify(pixel_values, p))  # (B, N, D)
        tokens = torch.cat([self.cls_token.expand(b, 1, -1), patches], dim=1)  # (B, 1 + N, D)
        return self.dropout(tokens + self.positions((h // p, w // p)))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, C, H, W), normalised as the model was trained → (B, 1 + N, D): the
        class token's and every patch's final state, after the final LayerNorm (eq. 4)."""
        x = self.embed(pixel_values)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def class_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The paper's y (eq. 4), the class token's final state alone: (B, C, H, W) → (B, D),
        equal to `forward(pixel_values)[:, 0]`. The last layer runs for the class token only
        (`EncoderLayer.forward_at`), which is all that CLIP's image embedding and a classifier
        read."""
        x = self.embed(pixel_values)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for layer in self.layers[:-1]:
            x = layer(x)
        class_token = torch.zeros(x.size(0), dtype=torch.long, device=x.device)
        return self.norm(self.layers[-1].forward_at(x, class_token)[:, 0])

    @classmethod
    def from_pretrained(cls, directory, device: str = "cpu") -> "ViT":
        """A ViT from a Hugging Face `ViTModel` / `ViTForImageClassification` directory (config.json
        and its weights; the pooler and the classifier are not read)."""
        from fromscratch.vlm import huggingface

        return huggingface.load_vit(cls, directory, device)
