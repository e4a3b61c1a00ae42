"""CoCa (Yu et al. 2022), "CoCa: Contrastive Captioners are Image-Text Foundation Models", §3.1–3.2
and Figure 2, at the size of a CPU: one model trained for a joint embedding space and for
writing text about an image.

    image encoder            ViT(image) → tokens (B, 1 + N, d_v)                     vit.py
    attentional pooler       one learned query attends over them → image embedding   §3.2 "Attentional Poolers"
    unimodal text decoder    causal layers over <s> w₁ … wₙ, with a [CLS] appended;  §3.2
                             the [CLS] state is the text embedding                    (clip.TextTransformer)
    multimodal text decoder  causal self-attention, cross-attention to the image      §3.2 "Decoupled Text Decoder"
                             patches, FFN (the Transformer's DecoderLayer) → logits
    L = λ_con·L_con + λ_cap·L_cap                                                     eq. 4
        L_con = symmetric InfoNCE of the two embeddings (clip.contrastive_loss)       eq. 1
        L_cap = −Σ_t log P(y_t | y_<t, image)                                         eq. 2

VQA is answer generation conditioned on the image and the question: the text is
`<s> question <sep> answer </s>` and L_cap counts the answer tokens only (the targets of the
question are the padding id, which the loss ignores). Decoding (greedy, beam search, the KV
cache with the image's keys and values projected once) is in decoding.py.

Where the code departs from the paper:
- The multimodal layers cross-attend to the ViT's patch tokens (projected to the text width),
  not to 256 queries of a second, "generative" pooler: our images have 36–100 patches, fewer
  than such a pooler's queries, and attention over the patches is what the cross-attention maps
  show. The contrastive embedding uses CoCa's pooler, with one query.
- The [CLS] has no position embedding. It is appended after the padding of a batch, where a
  position would depend on the longest text of the batch; attention does not see the order of
  its keys, so a position-free [CLS] that sees the real tokens (the padding is masked from it)
  gives the same embedding however a batch is padded (`test_text_embedding_ignores_padding`).
- Sizes, learned position embeddings and the optimiser are ours (presets in config.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fromscratch.blocks import KVCache
from fromscratch.errors import UserError
from fromscratch.transformer.model import DecoderCache, DecoderLayer, LayerNorm, MultiHeadAttention
from fromscratch.vlm.clip import LOGIT_SCALE_INIT, TextTransformer, contrastive_loss, l2_normalize
from fromscratch.vlm import decoding
from fromscratch.vlm.config import VLMConfig
from fromscratch.vlm.vit import ViT

IMAGE_MEAN, IMAGE_STD = 0.5, 0.5  # uint8 images map to [−1, 1]


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler (§3.2): n learned queries attend over the image tokens, then a
    LayerNorm. tokens (B, T, d) → (B, n_queries, d)."""

    def __init__(self, d_model: int, n_heads: int, n_queries: int, eps: float, use_sdpa: bool):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, d_model) * 0.02)
        self.attention = MultiHeadAttention(d_model, n_heads, use_sdpa)
        self.norm = LayerNorm(d_model, eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(tokens.size(0), -1, -1)
        return self.norm(self.attention(queries, tokens))


@dataclass
class VLMOutput:
    logits: torch.Tensor  # (N_texts, T, vocab): next-token logits of every text row
    image_embeds: torch.Tensor  # (B, embed_dim), unit norm
    text_embeds: torch.Tensor  # (N_texts, embed_dim), unit norm: the [CLS] of each text row
    logit_scale: torch.Tensor  # exp(t), the inverse temperature of the similarities


class VLM(nn.Module):
    """The contrastive captioner. `tokenizer` (a WordTokenizer) is needed by the methods that take
    or return text: `caption`, `answer`, `embed_texts`."""

    def __init__(self, config: VLMConfig, tokenizer=None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.settings: dict = {}  # a trained run's task.json: its data, decoding lengths (training.load_vlm)
        c = config
        self.vision = ViT(c.vision_config())
        self.image_pooler = AttentionalPooler(c.vision_d_model, c.vision_n_heads, 1, c.norm_eps, c.use_sdpa)
        self.image_projection = nn.Linear(c.vision_d_model, c.embed_dim, bias=False)
        self.patch_projection = nn.Linear(c.vision_d_model, c.d_model)  # image tokens → the decoder's width
        block = c.text_block_config()
        self.text = TextTransformer(block, c.n_unimodal_layers)  # the unimodal decoder
        self.cls_embedding = nn.Parameter(torch.randn(c.d_model) * 0.02)
        self.text_projection = nn.Linear(c.d_model, c.embed_dim, bias=False)
        self.multimodal_layers = nn.ModuleList(
            DecoderLayer(block, c.n_unimodal_layers + i) for i in range(c.n_multimodal_layers))
        self.decoder_norm = LayerNorm(c.d_model, c.norm_eps)
        self.output_projection = nn.Linear(c.d_model, c.vocab_size)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))  # t, as CLIP's
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform matrices and zero biases throughout (the Transformer's initialisation),
        replacing the ViT's and the text tower's N(0, 0.02²). The image reaches the next-word
        logits through several matrices in a row (patch projection, the cross-attention's values
        and output); at width 128 an N(0, 0.02²) matrix scales a vector by about 0.2, so the image's
        signal starts near zero and a small model learns the questions' answer priors long before
        it learns to look (on easy-VQA: colour questions at chance after 150 steps with N(0, 0.02²),
        95% right with Xavier)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # --- images --------------------------------------------------------------------------------

    def pixels(self, images) -> torch.Tensor:
        """uint8 images (B, C, H, W), or a list of PIL images (padded to a square and resized to
        image_size) → float pixel values in [−1, 1] on the model's device."""
        if not isinstance(images, torch.Tensor):
            from PIL import Image

            from fromscratch.vlm.data import image_to_array

            if isinstance(images, np.ndarray) or not all(isinstance(im, Image.Image) for im in images):
                raise TypeError("images must be a uint8 tensor (B, C, H, W) or a list of PIL images; for a numpy "
                                "array, torch.from_numpy(array) in (B, C, H, W) order")
            c = self.config
            images = torch.from_numpy(np.stack([image_to_array(im, c.image_size, c.n_channels) for im in images]))
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise UserError(f"images must be uint8 (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
        device = self.output_projection.weight.device
        return (images.to(device).float() / 255 - IMAGE_MEAN) / IMAGE_STD

    def image_embedding(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """ViT tokens (B, 1 + N, d_v) → the image's point in the joint space (B, embed_dim), unit norm."""
        return l2_normalize(self.image_projection(self.image_pooler(vision_tokens)[:, 0]))

    def image_memory(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """ViT tokens (B, 1 + N, d_v) → what the decoder attends to: the N patches, (B, N, d_model)."""
        return self.patch_projection(vision_tokens[:, 1:])

    # --- text ----------------------------------------------------------------------------------

    def unimodal(self, tokens: torch.Tensor, cache: DecoderCache | None = None, with_cls: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unimodal decoder: tokens (B, T) → (their states (B, T, d_model), the [CLS] state
        (B, d_model) after the final LayerNorm, or None). with_cls appends the [CLS] after the
        tokens; with a cache, tokens are the new positions after cache.length."""
        start = 0 if cache is None else cache.length
        x = self.text.embed(tokens, start)  # (B, T, d)
        mask = None
        if with_cls:
            b = tokens.size(0)
            x = torch.cat([x, self.cls_embedding.expand(b, 1, -1)], dim=1)  # (B, T + 1, d)
            real = torch.cat([tokens != self.config.pad_id, tokens.new_ones(b, 1, dtype=torch.bool)], dim=1)
            mask = real[:, None, None, :]  # the [CLS] sees the real tokens only
        self_cache = None if cache is None else cache.self_attention
        for layer in self.text.layers:
            x = layer(x, mask, is_causal=True, cache=self_cache)
        if not with_cls:
            return x, None
        return x[:, :-1], self.text.norm(x[:, -1])

    def decode(self, tokens: torch.Tensor, memory: torch.Tensor, cache: DecoderCache | None = None,
               with_cls: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole text decoder: tokens (B, T) → (decoder states (B, T, d_model) after the
        final LayerNorm, the [CLS] state or None). memory (B, N, d_model): the image patches each
        row attends to. With a cache, tokens are only the new positions, and the cache grows."""
        x, cls_state = self.unimodal(tokens, cache, with_cls)
        for layer in self.multimodal_layers:
            x = layer(x, memory, None, cache)
        if cache is not None:
            cache.self_attention.advance(tokens.size(1))
        return self.decoder_norm(x), cls_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_projection(hidden)

    def text_embedding(self, cls_state: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.text_projection(cls_state))

    def new_cache(self, max_len: int | None = None) -> DecoderCache:
        """An empty decoding cache: every text layer's self-attention keys and values (unimodal
        and multimodal share one KVCache, each layer its own slot), and the multimodal layers'
        cross-attention keys and values of the image, projected once (static)."""
        n = self.config.n_text_layers
        return DecoderCache(KVCache(n, max_len=max_len), KVCache(n, static=True))

    # --- training ------------------------------------------------------------------------------

    def image_keys_values(self, memory: torch.Tensor, image_index: torch.Tensor | None) -> KVCache:
        """Every multimodal layer's cross-attention keys and values of the images memory (B, N, d),
        projected once per image and repeated for each text row about it (row i: image
        image_index[i]): a static KVCache, (N_texts, n_heads, N, head_dim) per layer."""
        cache = KVCache(self.config.n_text_layers, static=True)
        for layer in self.multimodal_layers:
            attention = layer.cross_attention
            keys = attention.split_heads(attention.k_proj(memory))  # (B, n_heads, N, head_dim)
            values = attention.split_heads(attention.v_proj(memory))
            if image_index is not None:
                keys, values = keys.index_select(0, image_index), values.index_select(0, image_index)
            cache.update(attention.layer_index, keys, values)
        return cache

    def forward(self, pixel_values: torch.Tensor, tokens: torch.Tensor,
                image_index: torch.Tensor | None = None) -> VLMOutput:
        """pixel_values (B, C, H, W); tokens (N, T), text row i about image image_index[i]
        (default: row i about image i, N = B). Returns every output the two losses need.

        The same computation as `decode` (with the [CLS]), except that each image's keys and
        values are projected once for all the rows about it (`image_keys_values`)."""
        vision_tokens = self.vision(pixel_values)  # (B, 1 + P, d_v)
        memory = self.image_memory(vision_tokens)  # (B, P, d)
        x, cls_state = self.unimodal(tokens, with_cls=True)
        cross = DecoderCache(None, self.image_keys_values(memory, image_index))  # self-attention: no cache
        for layer in self.multimodal_layers:
            x = layer(x, None, None, cross)
        return VLMOutput(self.logits(self.decoder_norm(x)), self.image_embedding(vision_tokens),
                         self.text_embedding(cls_state), self.logit_scale.exp())

    # --- using the model -----------------------------------------------------------------------

    def _tokenizer(self):
        if self.tokenizer is None:
            raise UserError("this VLM has no tokenizer: load it with VLM.from_pretrained(run) or pass one")
        return self.tokenizer

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """uint8 images (B, C, H, W) or PIL images → (B, embed_dim), unit norm."""
        with decoding.evaluating(self):
            return self.image_embedding(self.vision(self.pixels(images)))

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts → (N, embed_dim), unit norm: each text read as in training, <s> w₁ … wₙ, and its [CLS]."""
        tokenizer = self._tokenizer()
        if isinstance(texts, str) or not texts:
            raise UserError("embed_texts takes a non-empty list of texts")
        rows = [[self.config.bos_id, *ids] for ids in tokenizer.encode_batch(texts)]
        tokens = pad_rows(rows, self.config.pad_id).to(self.output_projection.weight.device)
        with decoding.evaluating(self):
            return self.text_embedding(self.unimodal(tokens, with_cls=True)[1])

    def caption(self, images, beam_size: int = 1, max_new_tokens: int = 32) -> list[str]:
        """A caption of each image (greedy, or beam search with beam_size > 1)."""
        ids = decoding.caption_ids(self, self.pixels(images), beam_size, max_new_tokens)
        return self._tokenizer().decode_batch(ids.tolist())

    def answer(self, images, questions: list[str], max_new_tokens: int = 8, beam_size: int = 1) -> list[str]:
        """The answer to questions[i] about images[i] (greedy unless beam_size > 1)."""
        tokenizer = self._tokenizer()
        if len(questions) != len(images):
            raise UserError(f"{len(images)} images but {len(questions)} questions")
        answers = decoding.answer_ids(self, self.pixels(images), tokenizer.encode_batch(questions),
                                      max_new_tokens, beam_size)
        return tokenizer.decode_batch(answers)

    def zero_shot(self, images, prompts: list[str] | list[list[str]]) -> torch.Tensor:
        """Zero-shot classification by text prompts alone: prompts[k] names class k for every
        image, or prompts[i][k] names class k for image i. Returns the class of each image (B,)."""
        from fromscratch.vlm.clip import zero_shot_classify

        if not prompts or isinstance(prompts, str):
            raise UserError("zero_shot needs a list of class prompts (or one list per image)")
        image_embeds = self.embed_images(images)
        if isinstance(prompts[0], str):
            return zero_shot_classify(image_embeds, self.embed_texts(prompts))
        k = len(prompts[0])
        if len(prompts) != len(image_embeds) or any(len(row) != k or not row for row in prompts):
            raise UserError(f"per-image prompts: give one list of the same number of classes for each of the "
                            f"{len(image_embeds)} images")
        class_embeds = self.embed_texts([p for row in prompts for p in row]).view(len(prompts), k, -1)
        return zero_shot_classify(image_embeds, class_embeds)

    @classmethod
    def from_pretrained(cls, path, device: str = "cpu") -> "VLM":
        """The VLM of a `fromscratch vlm train` run (its best checkpoint, else its latest) or of
        one checkpoint directory in it, with the run's tokenizer."""
        from fromscratch.vlm import training

        return training.load_vlm(cls, path, device)


def coca_loss(config: VLMConfig, out: VLMOutput, targets: torch.Tensor, image_index: torch.Tensor | None = None,
              is_caption: torch.Tensor | None = None) -> tuple[torch.Tensor, int, dict[str, float]]:
    """CoCa's L = λ_con·L_con + λ_cap·L_cap (eq. 4) of a forward pass `out`, as a sum over the
    tokens it counts (the shared engine divides by their number).

    targets (N, T): the next token at each position of each text row, pad_id where nothing is
    predicted (the question of a VQA row, padding). is_caption (N,): the rows whose text
    describes their image, at most one per image: the positive pairs of L_con, each the others'
    negatives. image_index (N,): the image of each row (None: row i is about image i).
    Returns (λ_cap·Σ_t NLL + λ_con·L_con·n, n = the tokens counted, {"caption_nll": Σ_t NLL / n,
    "contrastive": L_con when two captions or more take part})."""
    nll = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=config.pad_id,
                          reduction="sum")
    n_tokens = int((targets != config.pad_id).sum())
    total = config.caption_loss_weight * nll
    parts = {"caption_nll": nll.item() / max(n_tokens, 1)}
    if is_caption is not None and int(is_caption.sum()) >= 2 and config.contrastive_loss_weight > 0:
        rows = is_caption.nonzero().squeeze(1)
        images = rows if image_index is None else image_index[rows]
        logits = out.logit_scale * out.image_embeds[images] @ out.text_embeds[rows].t()
        contrastive = contrastive_loss(logits.float())
        total = total + config.contrastive_loss_weight * contrastive * n_tokens
        parts["contrastive"] = contrastive.item()
    return total, n_tokens, parts


def pad_rows(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Token lists → (len(rows), longest) long tensor, right-padded with pad_id."""
    out = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
