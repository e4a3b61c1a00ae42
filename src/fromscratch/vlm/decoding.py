"""Writing text about an image: captions, answers, and where the decoder looked.

The searches are the package's shared ones (`fromscratch.blocks.sample` with temperature 0 for
greedy decoding, `fromscratch.blocks.beam_search`); what is the VLM's is `ImageNextToken`, the
next-token function. The image is encoded once; with the cache (the Transformer's
`DecoderCache`) the decoder is fed only the newest token, earlier positions' keys and values are
kept, and each multimodal layer projects the image patches to keys and values on the first step
only (a static `KVCache`). Without the cache the decoder reads the whole prefix again at every
step. Both give the same tokens (`test_cached_and_uncached_decoding_agree`).

A caption starts from `<s>`; an answer from `<s> question <sep>`. Questions of different
lengths are decoded in groups of equal length, so no prompt is padded and every row decodes
exactly as it would alone. <pad>, <s>, <sep> and <unk> are never generated.

`cross_attention_maps` gives, for each generated word, the decoder's attention over the image
patches (a distribution over the grid), for the figures of `figures.py`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from fromscratch.blocks import beam_search, sample
from fromscratch.errors import UserError
from fromscratch.transformer.decoding import ContextNextToken


@contextmanager
def evaluating(model):
    """Run in eval mode (no dropout: decoding is deterministic and cached = uncached), then
    restore the mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class ImageNextToken(ContextNextToken):
    """Logits of the next token for a batch of prefixes, given the image patches they are about
    (the context, kept once per image during beam search: `ContextNextToken`)."""

    def __init__(self, model, memory: torch.Tensor, use_cache: bool, max_len: int | None):
        super().__init__(memory, None, model.new_cache(max_len) if use_cache else None)  # memory (B, N, d_model)
        self.model = model
        c = model.config
        self.never = torch.tensor(sorted({c.pad_id, c.bos_id, c.sep_id, c.unk_id}), device=memory.device)

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix (N, t) → float32 logits (N, vocab_size) of token t + 1."""
        new = prefix if self.cache is None else prefix[:, self.cache.length :]
        hidden, _ = self.model.decode(new, self.memory, self.cache)  # (N, T_new, d_model)
        return self.model.logits(hidden[:, -1]).float().index_fill(1, self.never, float("-inf"))


@torch.no_grad()
def generate(model, memory: torch.Tensor, prompt: torch.Tensor, max_new_tokens: int, beam_size: int = 1,
             alpha: float = 0.6, use_cache: bool = True, stop_at_eos: bool = True) -> torch.Tensor:
    """Continue prompt (B, t₀) about the images whose patches are memory (B, N, d_model): greedy
    when beam_size is 1, else beam search with GNMT's length penalty α. Stops at </s> or after
    max_new_tokens (capped by the model's positions). Returns the new tokens (B, L), </s> kept,
    pad_id after it. stop_at_eos=False (greedy only) always runs max_new_tokens steps (for benchmarks)."""
    c = model.config
    if beam_size < 1:
        raise UserError(f"beam size must be at least 1, got {beam_size}")
    max_new_tokens = min(max_new_tokens, c.max_text_len - prompt.size(1))
    if max_new_tokens < 1:
        raise UserError(f"a prompt of {prompt.size(1)} tokens leaves no room in the model's {c.max_text_len} positions")
    next_token = ImageNextToken(model, memory, use_cache, max_len=prompt.size(1) + max_new_tokens)
    with evaluating(model):
        if beam_size == 1:
            tokens = sample(next_token, prompt, max_new_tokens, temperature=0.0,
                            eos_id=c.eos_id if stop_at_eos else None, fill_id=c.pad_id)
            return tokens[:, prompt.size(1):]
        return beam_search(next_token, prompt, max_new_tokens, beam_size, alpha, eos_id=c.eos_id, pad_id=c.pad_id)


@torch.no_grad()
def image_memory(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The patches the decoder attends to, (B, N, d_model), in eval mode."""
    with evaluating(model):
        return model.image_memory(model.vision(pixel_values))


def caption_ids(model, pixel_values: torch.Tensor, beam_size: int = 1, max_new_tokens: int = 32,
                use_cache: bool = True) -> torch.Tensor:
    """Caption token ids (B, L) of images pixel_values (B, C, H, W)."""
    memory = image_memory(model, pixel_values)
    prompt = torch.full((memory.size(0), 1), model.config.bos_id, dtype=torch.long, device=memory.device)
    return generate(model, memory, prompt, max_new_tokens, beam_size, use_cache=use_cache)


def question_prompt(config, question_ids: list[int]) -> list[int]:
    """<s> question <sep>: what the decoder reads before it answers."""
    return [config.bos_id, *question_ids, config.sep_id]


def answer_ids(model, pixel_values: torch.Tensor, questions: list[list[int]], max_new_tokens: int = 8,
               beam_size: int = 1, use_cache: bool = True) -> list[list[int]]:
    """The answer's token ids (up to </s>) to questions[i] about image i, questions decoded in
    groups of equal length."""
    memory = image_memory(model, pixel_values)
    prompts = [question_prompt(model.config, q) for q in questions]
    answers: list[list[int]] = [[] for _ in prompts]
    for length in sorted({len(p) for p in prompts}):
        rows = [i for i, p in enumerate(prompts) if len(p) == length]
        prompt = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=memory.device)
        index = torch.tensor(rows, device=memory.device)
        new = generate(model, memory.index_select(0, index), prompt, max_new_tokens, beam_size, use_cache=use_cache)
        for i, ids in zip(rows, new.tolist()):
            answers[i] = ids
    return answers


@torch.no_grad()
def cross_attention_maps(model, pixel_values: torch.Tensor, prompt: torch.Tensor, generated: torch.Tensor
                         ) -> torch.Tensor:
    """Where the decoder looked while writing `generated` (B, L) after `prompt` (B, t₀): for each
    generated token, the cross-attention weights over the image patches, averaged over the heads
    of every multimodal layer, (B, L, grid_h, grid_w); each map sums to 1.

    The decoder reads prompt + generated[:, :-1] at once (teacher forcing on its own output): with
    the causal mask, row t₀ − 1 + j is exactly the attention of the step that produced token j."""
    layers = [layer.cross_attention for layer in model.multimodal_layers]
    try:
        with evaluating(model):
            memory = model.image_memory(model.vision(pixel_values))
            for attention in layers:
                attention.record_weights = True
            model.decode(torch.cat([prompt, generated[:, :-1]], dim=1), memory)
            weights = torch.stack([a.weights for a in layers]).mean(dim=(0, 2))  # (B, T, N)
    finally:
        for attention in layers:
            attention.record_weights, attention.weights = False, None
    t0 = prompt.size(1)
    p = model.config.patch_size
    grid = (pixel_values.size(2) // p, pixel_values.size(3) // p)
    return weights[:, t0 - 1:].reshape(weights.size(0), -1, *grid)
