"""Decoding a Transformer: greedy search, sampling and beam search, §6.1 of Vaswani et al. (2017).

    "We used beam search with a beam size of 4 and length penalty α = 0.6. … We set the
    maximum output length during inference to input length + 50, but terminate early when
    possible."

The searches themselves are the package's shared ones (`fromscratch.blocks.search`). What is the
Transformer's is `TranslationNextToken`: the encoder runs once, and each step asks the decoder
for the next token's logits. With the cache it feeds the decoder only the newest token (earlier
positions' keys and values are kept, and the encoder output's are projected once); without, it
runs the decoder over the whole prefix again. Both give the same tokens. The padding token and
the decoder's start token are never generated.

`length_penalty_style="hf"` makes beam search rank, stop and ban exactly as Hugging Face's
`MarianMTModel.generate(num_beams=K, length_penalty=α)` does (`fromscratch.blocks.search`):
with a Marian checkpoint the translations are then the same token for token.

Every function returns (B, L) token ids: no leading start token, the EOS when one was produced,
and pad_id after it.
"""

import torch

from fromscratch.blocks import beam_search as shared_beam_search
from fromscratch.blocks import check_sampling_options, gnmt_length_penalty, sample
from fromscratch.blocks.search import LENGTH_PENALTY_STYLES, check_ngram_size, shared_rows
from fromscratch.errors import UserError

length_penalty = gnmt_length_penalty  # §6.1 ranks beams with GNMT's lp(Y) = ((5 + |Y|) / 6)^α


class ContextNextToken:
    """What the next-token functions of a decoder that cross-attends to a fixed context share
    (the Transformer's encoded source, the VLM's image patches): the context `memory` (B, S,
    d_model), its padding mask (None: no padding), the `DecoderCache` (None: no cache), and how
    beam search moves them."""

    def __init__(self, memory: torch.Tensor, src_mask: torch.Tensor | None, cache):
        self.memory, self.src_mask, self.cache = memory, src_mask, cache
        self.group = 1  # rows of the search per row of memory (beam search: the beams of a source)

    def reorder(self, rows: torch.Tensor, within_prompts: bool = False) -> None:
        """Keep rows `rows`: beam search moves each beam's state along with it. The context (and
        its projected keys and values) is the same for every beam of a source: it is kept once
        per source, and its `group` consecutive rows attend to it."""
        context_rows = None
        if not within_prompts:
            context_rows, self.group = shared_rows(rows, self.group)
            self.memory = self.memory.index_select(0, context_rows)
            if self.src_mask is not None:
                self.src_mask = self.src_mask.index_select(0, context_rows)
        if self.cache is not None:
            self.cache.reorder(rows, context_rows)


class TranslationNextToken(ContextNextToken):
    """Logits of the next target token for a batch of prefixes, given the encoded sources.
    The tokens never generated (`never`: pad, start) get −∞ logits, unless `ban` is False and
    the search bans them itself."""

    def __init__(self, model, memory: torch.Tensor, src_mask: torch.Tensor | None, use_cache: bool,
                 max_len: int | None = None, ban: bool = True):
        # Sources without padding need no mask: the cross-attention then builds none at every step.
        if src_mask is not None and bool(src_mask.all()):
            src_mask = None
        super().__init__(memory, src_mask, model.new_cache(max_len) if use_cache else None)
        self.model = model
        # The packed one-token step (fast.py), its weights checked once for the whole search.
        self.decode_step = model.decode_step.for_one_search() if use_cache and model.decode_step is not None else None
        config = model.config
        self.never = torch.tensor(sorted({config.pad_id, config.start_id}), device=memory.device)
        self.ban = ban

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix (N, t), starting with the start token → float32 logits (N, vocab_size) of token t + 1."""
        new = prefix if self.cache is None else prefix[:, self.cache.length :]
        if self.decode_step is not None and new.size(1) == 1:
            logits = self.decode_step(new[:, 0], self.memory, self.src_mask, self.cache)  # fast.py
        else:
            hidden = self.model.decode(new, self.memory, self.src_mask, self.cache)  # (N, T_new, d_model)
            logits = self.model.logits(hidden[:, -1]).float()
        return logits.index_fill(1, self.never, float("-inf")) if self.ban else logits


def _start(model, src_ids: torch.Tensor, use_cache: bool, max_new_tokens: int, ban: bool = True):
    """The encoded sources, their next-token function, and the decoder's first input column."""
    memory, src_mask = model.encode(src_ids)
    next_token = TranslationNextToken(model, memory, src_mask, use_cache, max_len=max_new_tokens + 1, ban=ban)
    start = torch.full((src_ids.size(0), 1), model.config.start_id, dtype=torch.long, device=src_ids.device)
    return next_token, start


@torch.no_grad()
def greedy_decode(model, src_ids, max_new_tokens: int, use_cache: bool = True, stop_at_eos: bool = True,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None, no_repeat_ngram_size: int = 0):
    """Pick the most likely token at every step (or sample, when temperature > 0).
    src_ids (B, S) → (B, L), L ≤ max_new_tokens. stop_at_eos=False always runs max_new_tokens
    steps (for benchmarks). no_repeat_ngram_size n > 0: never repeat an n-gram (blocks/search.py)."""
    config = model.config
    next_token, start = _start(model, src_ids, use_cache, max_new_tokens)
    tokens = sample(next_token, start, max_new_tokens, temperature, top_k, top_p, generator,
                    eos_id=config.eos_id if stop_at_eos else None, fill_id=config.pad_id,
                    no_repeat_ngram_size=no_repeat_ngram_size)
    return tokens[:, 1:]


@torch.no_grad()
def beam_search(model, src_ids, max_new_tokens: int, beam_size: int = 4, alpha: float = 0.6, use_cache: bool = True,
                length_penalty_style: str = "gnmt", no_repeat_ngram_size: int = 0):
    """Keep the beam_size most probable translations of every source, batched. src_ids (B, S) →
    (B, L): each source's finished hypothesis of highest log P / lp; a source with none by
    max_new_tokens gets its best unfinished beam. length_penalty_style "hf": as transformers
    (module docstring), which bans pad and start after the softmax rather than before."""
    config = model.config
    hf = length_penalty_style == "hf"
    next_token, start = _start(model, src_ids, use_cache, max_new_tokens, ban=not hf)
    return shared_beam_search(next_token, start, max_new_tokens, beam_size, alpha, eos_id=config.eos_id,
                              pad_id=config.pad_id, length_penalty_style=length_penalty_style,
                              banned=next_token.never if hf else None, no_repeat_ngram_size=no_repeat_ngram_size)


@torch.no_grad()
def generate(model, src_ids: torch.Tensor, max_new_tokens: int | None = None, beam_size: int = 1,
             length_penalty: float = 0.6, use_cache: bool = True, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             length_penalty_style: str = "gnmt", no_repeat_ngram_size: int = 0) -> torch.Tensor:
    """Translate src_ids (B, S): greedy when beam_size == 1 and temperature == 0, sampled when
    temperature > 0 (with top_k / top_p, reproducibly with `seed`), else beam search with the GNMT
    length penalty α = length_penalty (§6.1 uses beam 4, α 0.6), or with transformers' ranking
    and stopping rule when length_penalty_style is "hf" (its default α is 1.0). Stops at EOS or after
    max_new_tokens (default: source length + 50, §6.1; at most max_seq_len). no_repeat_ngram_size
    n > 0: no n-gram twice in an output, as transformers' option of that name.
    Returns (B, L): no leading start token, the EOS when produced, right-padded with pad_id."""
    if beam_size < 1:
        raise UserError(f"beam_size must be at least 1, got {beam_size}")
    if length_penalty_style not in LENGTH_PENALTY_STYLES:
        raise UserError(f"length_penalty_style {length_penalty_style!r}: "
                        f"choose one of {', '.join(LENGTH_PENALTY_STYLES)}")
    check_sampling_options(temperature, top_k, top_p)
    check_ngram_size(no_repeat_ngram_size)
    if beam_size > 1 and temperature > 0:
        raise UserError("beam search is deterministic: use temperature 0 with beam_size > 1, or beam_size 1 to sample")
    config = model.config
    if max_new_tokens is None:
        max_new_tokens = int((src_ids != config.pad_id).sum(dim=1).max()) + 50
    max_new_tokens = min(max_new_tokens, config.max_seq_len)
    generator = None if seed is None else torch.Generator(device=src_ids.device).manual_seed(seed)
    was_training = model.training
    model.eval()  # dropout would make generation random (and cached ≠ uncached)
    try:
        if beam_size == 1:
            return greedy_decode(model, src_ids, max_new_tokens, use_cache=use_cache, temperature=temperature,
                                 top_k=top_k, top_p=top_p, generator=generator,
                                 no_repeat_ngram_size=no_repeat_ngram_size)
        return beam_search(model, src_ids, max_new_tokens, beam_size, length_penalty, use_cache=use_cache,
                           length_penalty_style=length_penalty_style, no_repeat_ngram_size=no_repeat_ngram_size)
    finally:
        model.train(was_training)


@torch.no_grad()
def sequence_scores(model, src_ids, out_ids, alpha: float = 0.6) -> torch.Tensor:
    """The score beam search ranks by, log P(Y | X) / lp(Y), of outputs out_ids (B, L) as the
    functions above return them (no start token; EOS, then padding, optional). Returns (B,)."""
    config = model.config
    start = torch.full((out_ids.size(0), 1), config.start_id, dtype=torch.long, device=out_ids.device)
    log_probs = model(src_ids, torch.cat([start, out_ids[:, :-1]], dim=1)).float().log_softmax(dim=-1)
    token_log_probs = log_probs.gather(2, out_ids[:, :, None]).squeeze(2)  # (B, L)
    real = out_ids != config.pad_id
    lengths = real.sum(dim=1)
    lp = torch.tensor([length_penalty(int(n), alpha) for n in lengths], device=out_ids.device)
    return token_log_probs.masked_fill(~real, 0.0).sum(dim=1) / lp
