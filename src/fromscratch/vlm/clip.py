"""CLIP (Radford et al. 2021), "Learning Transferable Visual Models From Natural Language
Supervision", §2.3–2.5 and Figure 3: an image tower and a text tower that map into one space.

    I_f = ViT(image)[class token]        image tower: our ViT, with CLIP's LayerNorm before the
                                         first layer (§2.4) and the final LayerNorm (post_layernorm)
    T_f = TextTransformer(text)[EOS]     text tower: a causal Transformer; the state at the
                                         end-of-text token, after a final LayerNorm (§2.4)
    I_e = I_f W_i / ‖·‖,  T_e = T_f W_t / ‖·‖                      projections, L2 normalisation
    logits = exp(t) · I_e T_eᵀ          (images × texts)           cosine similarity / temperature
    loss = ½ (CE(logits, diag) + CE(logitsᵀ, diag))                symmetric InfoNCE (Figure 3)

The temperature τ = exp(−t) is learnt (§2.5), t initialised to log(1/0.07); "clipped to prevent
scaling the logits by more than 100". As open_clip does, the clipping is a clamp of t to
[0, ln 100] after every optimiser step (`clamp_logit_scale`); the forward pass uses exp(t) as it
is, as Hugging Face's `CLIPModel` does, so loaded checkpoints compute what they computed there.

Both towers are built from the Transformer's own pieces: `EncoderLayer` (pre-norm, quick GELU,
causal for the text) and `LayerNorm`. The text tower (`TextTransformer`) is also the VLM's
unimodal text decoder (model.py).

Where the code departs from OpenAI's:
- Pooling at the end-of-text token follows Hugging Face's rule: the first `eos_id` in each row,
  except when eos_id is 2 (configs written before transformers PR #24773), where the largest
  token id in the row is taken (OpenAI's EOT is the last token of its vocabulary). Under the
  first rule a row without `eos_id` is refused with an error naming the row, where `CLIPModel`
  silently reads position 0, before the text.
- One `norm_eps` and one `activation` for both towers (every published CLIP has the same in
  both; a checkpoint whose towers differ is refused when loaded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromscratch.config import ModelConfig
from fromscratch.errors import UserError
from fromscratch.transformer.config import TransformerConfig
from fromscratch.transformer.model import EncoderLayer, LayerNorm
from fromscratch.vlm.vit import ViT, ViTConfig

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # t₀: τ = 0.07 (§2.5)
LOGIT_SCALE_MAX = math.log(100)  # exp(t) ≤ 100


@dataclass
class CLIPConfig(ModelConfig):
    embed_dim: int = 512  # the joint space (Hugging Face's projection_dim)
    # image tower
    image_size: int = 224
    patch_size: int = 32
    n_channels: int = 3
    vision_d_model: int = 768
    vision_n_layers: int = 12
    vision_n_heads: int = 12
    vision_d_ff: int = 3072
    # text tower
    vocab_size: int = 49408
    max_text_len: int = 77
    text_d_model: int = 512
    text_n_layers: int = 12
    text_n_heads: int = 8
    text_d_ff: int = 2048
    eos_id: int = 49407
    # both
    activation: str = "quick_gelu"
    norm_eps: float = 1e-5
    logit_scale_init: float = LOGIT_SCALE_INIT
    use_sdpa: bool = True

    PRESETS = {
        "ViT-B/32": {},  # OpenAI's clip-vit-base-patch32
        "ViT-B/16": dict(patch_size=16),
        "tiny": dict(embed_dim=64, image_size=32, patch_size=4, vision_d_model=64, vision_n_layers=2,
                     vision_n_heads=4, vision_d_ff=256, vocab_size=1000, max_text_len=32, text_d_model=64,
                     text_n_layers=2, text_n_heads=4, text_d_ff=256,
                     eos_id=1),  # not 2: that id takes Hugging Face's legacy rule (pooling at the largest id)
    }

    def validate(self) -> None:
        self.vision_config()  # the image tower's own checks
        self.text_block_config()
        if not 0 <= self.eos_id < self.vocab_size:
            raise UserError(f"eos_id={self.eos_id} is not a token of a {self.vocab_size}-token vocabulary")
        if self.embed_dim < 1 or self.max_text_len < 1:
            raise UserError(f"embed_dim and max_text_len must be positive, got {self.embed_dim}, {self.max_text_len}")

    def vision_config(self) -> ViTConfig:
        return ViTConfig(image_size=self.image_size, patch_size=self.patch_size, n_channels=self.n_channels,
                         d_model=self.vision_d_model, n_layers=self.vision_n_layers, n_heads=self.vision_n_heads,
                         d_ff=self.vision_d_ff, norm_eps=self.norm_eps, activation=self.activation,
                         patch_bias=False, pre_norm=True, use_sdpa=self.use_sdpa)

    def text_block_config(self) -> TransformerConfig:
        return TransformerConfig(vocab_size=self.vocab_size, d_model=self.text_d_model, n_heads=self.text_n_heads,
                                 d_ff=self.text_d_ff, dropout=0.0, max_seq_len=self.max_text_len, norm_first=True,
                                 norm_eps=self.norm_eps, activation=self.activation, use_sdpa=self.use_sdpa,
                                 pad_id=0, bos_id=0, eos_id=self.eos_id)


class TextTransformer(nn.Module):
    """CLIP's text tower (§2.4): token embeddings + learned position embeddings, causal pre-norm
    Transformer layers, a final LayerNorm. tokens (B, T) → (B, T, d_model).

    `first_layer_index` numbers the layers' slots in a KVCache, for a model that decodes with
    more layers after these (the VLM)."""

    def __init__(self, block: TransformerConfig, n_layers: int, first_layer_index: int = 0):
        super().__init__()
        self.max_len = block.max_seq_len
        self.token_embedding = nn.Embedding(block.vocab_size, block.d_model)
        self.position_embedding = nn.Parameter(torch.zeros(block.max_seq_len, block.d_model))
        self.dropout = nn.Dropout(block.dropout)
        self.layers = nn.ModuleList(EncoderLayer(block, first_layer_index + i) for i in range(n_layers))
        self.norm = LayerNorm(block.d_model, block.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """OpenAI's initialisation: token embeddings N(0, 0.02²), positions N(0, 0.01²); the
        layers' matrices truncated N(0, 0.02²) with zero biases."""
        for module in self.layers.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """tokens (B, T) at positions start, start + 1, … → (B, T, d_model)."""
        end = start + tokens.size(1)
        if end > self.max_len:
            raise UserError(f"a text of {end} tokens is longer than the model's {self.max_len} positions")
        return self.dropout(self.token_embedding(tokens) + self.position_embedding[start:end])

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T); attention_mask (B, T), 1 at real tokens and 0 at padding (None: all
        real). Returns every position's final state, (B, T, d_model)."""
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, mask, is_causal=True)
        return self.norm(x)

    def states_at(self, tokens: torch.Tensor, positions: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final state at one position of each row, positions (B,) → (B, d_model), equal to
        `forward(tokens, attention_mask)[rows, positions]`; the last layer runs for that position
        only (`EncoderLayer.forward_at`), which is all that the pooled text embedding reads.

        Under the causal mask no position sees a later one, so the columns after the last of
        `positions` (the padding after each end of text, in texts padded to a fixed length as
        OpenAI's `clip.tokenize` pads them to 77) are not computed at all."""
        end = int(positions.max()) + 1 if positions.numel() else 0
        tokens = tokens[:, :end]  # (B, T') with T' ≤ T
        attention_mask = None if attention_mask is None else attention_mask[:, :end]
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.embed(tokens)
        if not self.layers:
            return self.norm(x[torch.arange(x.size(0), device=x.device), positions])
        for layer in self.layers[:-1]:
            x = layer(x, mask, is_causal=True)
        return self.norm(self.layers[-1].forward_at(x, positions, mask, is_causal=True)[:, 0])


def eos_positions(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B,) where each row's text ends, by Hugging Face's rule (module docstring). A row without
    `eos_id` is refused (`CLIPModel` would read it at position 0, before the text)."""
    if eos_id == 2:
        return tokens.argmax(dim=-1)
    is_eos = tokens == eos_id
    missing = (~is_eos.any(dim=-1)).nonzero()
    if len(missing):
        raise UserError(f"text {int(missing[0])} of the batch has no end-of-text token (id {eos_id}): "
                        "CLIP reads each text at its end of text")
    return is_eos.int().argmax(dim=-1)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (Figure 3): image i and text i are the positive pair of row i and of
    column i; every other entry of the row (column) is a negative. logits (N, N) → scalar."""
    labels = torch.arange(logits_per_image.size(0), device=logits_per_image.device)
    image_to_text = F.cross_entropy(logits_per_image, labels)
    text_to_image = F.cross_entropy(logits_per_image.t(), labels)
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def clamp_logit_scale(logit_scale: nn.Parameter) -> None:
    """t ← clamp(t, 0, ln 100), open_clip's clipping of the temperature after an optimiser step."""
    logit_scale.clamp_(0, LOGIT_SCALE_MAX)


def zero_shot_classify(image_embeds: torch.Tensor, class_embeds: torch.Tensor) -> torch.Tensor:
    """Zero-shot classification (§3.1.2): the class whose prompt's embedding is nearest.

    image_embeds (N, e), normalised; class_embeds (K, e) shared by every image, or (N, K, e) with
    prompts of each image's own (e.g. naming its colour). Returns the predicted class, (N,)."""
    if class_embeds.dim() == 2:
        return (image_embeds @ class_embeds.t()).argmax(dim=-1)
    return torch.einsum("ne,nke->nk", image_embeds, class_embeds).argmax(dim=-1)


class CLIP(nn.Module):
    """CLIP: `embed_images`, `embed_texts`, and `forward` → logits_per_image (images × texts)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.vision = ViT(config.vision_config())
        self.text = TextTransformer(config.text_block_config(), config.text_n_layers)
        self.image_projection = nn.Linear(config.vision_d_model, config.embed_dim, bias=False)  # W_i
        self.text_projection = nn.Linear(config.text_d_model, config.embed_dim, bias=False)  # W_t
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init))  # t
        for projection in (self.image_projection, self.text_projection):
            nn.init.normal_(projection.weight, std=projection.in_features**-0.5)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), normalised with the model's mean and std → I_e (B, embed_dim), unit norm."""
        return l2_normalize(self.image_projection(self.vision.class_state(pixel_values)))

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids, each row holding its end-of-text token → T_e (B, embed_dim), unit norm."""
        pooled = self.text.states_at(input_ids, eos_positions(input_ids, self.config.eos_id), attention_mask)  # (B, d)
        return l2_normalize(self.text_projection(pooled))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """logits_per_image (B_images, B_texts) = exp(t) · cosine similarities."""
        image_embeds = self.embed_images(pixel_values)
        text_embeds = self.embed_texts(input_ids, attention_mask)
        return self.logit_scale.exp() * image_embeds @ text_embeds.t()

    def loss(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The symmetric InfoNCE of a batch of matching (image i, text i) pairs."""
        return contrastive_loss(self(pixel_values, input_ids, attention_mask))

    @classmethod
    def from_pretrained(cls, directory, device: str = "cpu") -> "CLIP":
        """A CLIP from a Hugging Face `CLIPModel` directory (config.json and its weights)."""
        from fromscratch.vlm import huggingface

        return huggingface.load_clip(cls, directory, device)

    def save_pretrained(self, out_dir):
        """Write a Hugging Face directory that `transformers.CLIPModel.from_pretrained` loads."""
        from fromscratch.vlm import huggingface

        return huggingface.save_clip(self, out_dir)
