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
import torch.nn.functional as F

from fromscratch.blocks import beam_search as shared_beam_search
from fromscratch.blocks import check_sampling_options, gnmt_length_penalty, sample
from fromscratch.blocks.search import LENGTH_PENALTY_STYLES, check_generation_inputs, check_ngram_size, shared_rows
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
        return self.banned(logits)

    def banned(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (N, vocab_size) with the tokens never generated at −∞ (a copy), when this function bans them."""
        return logits.index_fill(1, self.never, float("-inf")) if self.ban else logits


class SourcePool(TranslationNextToken):
    """`TranslationNextToken` for beam search's `pool` (`fromscratch.blocks.search`): the first
    `pool` sources are searched first, and each later one takes the rows of a source that is done
    (`admit`): its encoder output, padding mask and cross-attention keys and values go into that
    source's row, and its beams start at position 0 while the others go on (every row counts its
    own positions, `KVCache.row_lengths`). The sources are encoded `pool` at a time, in order, as
    batches of `pool` would be, and each such chunk's cross-attention keys and values of every
    layer come from one product. Needs the packed decoding step (`fast.accelerate`, on a CPU)."""

    def __init__(self, model, src_ids: torch.Tensor, pool: int, max_len: int, ban: bool = True):
        self.model, self.pool = model, pool
        self.sources = src_ids  # (B, S): every source, in the order they join
        self.chunk = None  # the last `pool` sources encoded: (first source, encoder output, mask, [(keys, values)])
        cross = [(layer.cross_attention.k_proj, layer.cross_attention.v_proj) for layer in model.decoder_layers]
        projections = [p for pair in cross for p in pair]
        self.context_projection = (torch.cat([p.weight for p in projections]),  # (2·layers·d_model, d_model)
                                   None if projections[0].bias is None else torch.cat([p.bias for p in projections]))
        (_, memory, src_mask, keys_values), = self.encoded(0, min(pool, len(src_ids)))
        # Copies: what joins later is written into these rows, and the chunk must stay as it is.
        super().__init__(model, memory.clone(), None, use_cache=True, max_len=max_len, ban=ban)
        self.src_mask = src_mask.clone()  # kept even without padding: later sources may have some
        for layer, (keys, values) in enumerate(keys_values):
            self.cache.cross_attention.update(layer, keys.contiguous(), values.contiguous())
        self.cache.self_attention.row_lengths = torch.zeros(len(memory), dtype=torch.long, device=memory.device)

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix (N, t), right-aligned (a row's tokens are its last columns) → float32 logits (N, vocab_size)."""
        return self.banned(self.decode_step(prefix[:, -1], self.memory, self.src_mask, self.cache))  # fast.py

    def encoded(self, first: int, end: int) -> list:
        """Sources first … end − 1, encoded: one (offset among them, encoder output (n, S, d_model),
        mask (n, 1, 1, S), [(keys, values)] each (n, n_heads, S, d_k) a layer) per chunk they span."""
        parts, config, offset = [], self.model.config, 0
        while first < end:
            if self.chunk is None or not self.chunk[0] <= first < self.chunk[0] + len(self.chunk[1]):
                ids = self.sources[first:first + self.pool]  # the next `pool` sources, right-padded
                memory, mask = self.model.encode(ids[:, :int((ids != config.pad_id).sum(dim=1).max())])
                n, src_len, _ = memory.shape
                projected = F.linear(memory, *self.context_projection)  # (n, S, 2·layers·d_model)
                heads = projected.view(n, src_len, -1, 2, config.n_heads, config.d_model // config.n_heads)
                keys_values = [(heads[:, :, i, 0].transpose(1, 2), heads[:, :, i, 1].transpose(1, 2))
                               for i in range(heads.size(2))]
                self.chunk = first, memory, mask, keys_values
            start, memory, mask, keys_values = self.chunk
            rows = slice(first - start, min(end, start + len(memory)) - start)
            parts.append((offset, memory[rows], mask[rows],
                          [(keys[rows], values[rows]) for keys, values in keys_values]))
            offset, first = offset + rows.stop - rows.start, start + rows.stop
        return parts

    def admit(self, rows: torch.Tensor, sources: torch.Tensor) -> None:
        """Sources `sources` (n,), consecutive, start in rows `rows` (n·K,), in place of sources
        that are done."""
        context = rows[::self.group] // self.group  # their rows of the encoder output
        cross = self.cache.cross_attention
        for offset, memory, mask, keys_values in self.encoded(int(sources[0]), int(sources[-1]) + 1):
            src_len = memory.size(1)
            if src_len > self.memory.size(1):  # longer than any so far: widen (by 8, to do it rarely)
                width = -(-src_len // 8) * 8
                self.memory, self.src_mask = padded(self.memory, 1, width, 0.0), padded(self.src_mask, 3, width, False)
                cross.keys = [padded(keys, 2, width, 0.0) for keys in cross.keys]
                cross.values = [padded(values, 2, width, 0.0) for values in cross.values]
            # Beyond the source's length its row keeps what it held (finite), which the mask hides.
            slots = context[offset:offset + len(memory)]
            self.memory.narrow(1, 0, src_len).index_copy_(0, slots, memory)
            self.src_mask.index_copy_(0, slots, padded(mask, 3, self.src_mask.size(3), False))
            for (keys, values), held_keys, held_values in zip(keys_values, cross.keys, cross.values):
                held_keys.narrow(2, 0, src_len).index_copy_(0, slots, keys)
                held_values.narrow(2, 0, src_len).index_copy_(0, slots, values)
        self.cache.self_attention.restart_rows(rows)


def padded(x: torch.Tensor, dim: int, size: int, value) -> torch.Tensor:
    """`x` padded with `value` at the end of dimension `dim` to `size` (x itself when that long)."""
    if x.size(dim) >= size:
        return x
    return torch.cat([x, x.new_full((*x.shape[:dim], size - x.size(dim), *x.shape[dim + 1:]), value)], dim)


def _start(model, src_ids: torch.Tensor, use_cache: bool, max_new_tokens: int, ban: bool = True):
    """The encoded sources, their next-token function, and the decoder's first input column."""
    memory, src_mask = model.encode(src_ids)
    next_token = TranslationNextToken(model, memory, src_mask, use_cache, max_len=max_new_tokens + 1, ban=ban)
    return next_token, start_column(model, src_ids.size(0), src_ids.device)


def start_column(model, n: int, device) -> torch.Tensor:
    """The decoder's first input for `n` sequences: (n, 1) start tokens."""
    return torch.full((n, 1), model.config.start_id, dtype=torch.long, device=device)


def shifted_right(model, out_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's input that predicts outputs out_ids (B, L) under teacher forcing: the start
    token, then out_ids but its last token, (B, L)."""
    return torch.cat([start_column(model, out_ids.size(0), out_ids.device), out_ids[:, :-1]], dim=1)


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
def beam_search(model, src_ids, max_new_tokens: int | torch.Tensor, beam_size: int = 4, alpha: float = 0.6,
                use_cache: bool = True, length_penalty_style: str = "gnmt", no_repeat_ngram_size: int = 0,
                pool: int | None = None):
    """Keep the beam_size most probable translations of every source, batched. src_ids (B, S) →
    (B, L): each source's finished hypothesis of highest log P / lp; a source with none by
    max_new_tokens (one number, or (B,) one each) gets its best unfinished beam. length_penalty_style
    "hf": as transformers (module docstring), which bans pad and start after the softmax rather
    than before. pool: at most `pool` sources at a time, each later one taking the rows of one
    that is done (`SourcePool`; needs `can_pool`)."""
    config = model.config
    hf = length_penalty_style == "hf"
    if pool is None:
        next_token, start = _start(model, src_ids, use_cache, max_new_tokens, ban=not hf)
    else:
        longest = int(torch.as_tensor(max_new_tokens).max())
        next_token = SourcePool(model, src_ids, pool, max_len=longest + 1, ban=not hf)
        start = start_column(model, src_ids.size(0), src_ids.device)
    return shared_beam_search(next_token, start, max_new_tokens, beam_size, alpha, eos_id=config.eos_id,
                              pad_id=config.pad_id, length_penalty_style=length_penalty_style,
                              banned=next_token.never if hf else None, no_repeat_ngram_size=no_repeat_ngram_size,
                              pool=pool)


def can_pool(model, use_cache: bool, no_repeat_ngram_size: int) -> bool:
    """Whether beam search can keep a pool of sources (`SourcePool`): the packed step with the
    cache (a CPU, `accelerate`d; generate then decodes in eval mode), and no n-gram ban (which
    reads the rows' tokens)."""
    return (use_cache and not no_repeat_ngram_size and model.decode_step is not None
            and model.decode_step.current() is not None)


@torch.no_grad()
def generate(model, src_ids: torch.Tensor, max_new_tokens: int | None = None, beam_size: int = 1,
             length_penalty: float = 0.6, use_cache: bool = True, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             length_penalty_style: str = "gnmt", no_repeat_ngram_size: int = 0,
             pool: int | None = None) -> torch.Tensor:
    """Translate src_ids (B, S): greedy when beam_size == 1 and temperature == 0, sampled when
    temperature > 0 (with top_k / top_p, reproducibly with `seed`), else beam search with the GNMT
    length penalty α = length_penalty (§6.1 uses beam 4, α 0.6), or with transformers' ranking
    and stopping rule when length_penalty_style is "hf" (its default α is 1.0). Stops at EOS or after
    max_new_tokens (default: source length + 50, §6.1; at most max_seq_len). no_repeat_ngram_size
    n > 0: no n-gram twice in an output, as transformers' option of that name.
    pool: decode at most `pool` sources at a time. Beam search with the cache on a CPU then keeps
    its batch full, a waiting source taking the rows of each that is done, and each source's
    default limit is its own length + 50 (`beam_search`'s pool); otherwise the sources are
    decoded `pool` at a time in turn.
    Returns (B, L): no leading start token, the EOS when produced, right-padded with pad_id."""
    check_generation_inputs(src_ids, model.config.vocab_size, beam_size, max_new_tokens, "src_ids")
    if src_ids.size(0) == 0 or src_ids.size(1) == 0:
        raise UserError(f"src_ids of shape {tuple(src_ids.shape)}: give at least one source of at least one token")
    if beam_size < 1:
        raise UserError(f"beam_size must be at least 1, got {beam_size}")
    if length_penalty_style not in LENGTH_PENALTY_STYLES:
        raise UserError(f"length_penalty_style {length_penalty_style!r}: "
                        f"choose one of {', '.join(LENGTH_PENALTY_STYLES)}")
    check_sampling_options(temperature, top_k, top_p)
    check_ngram_size(no_repeat_ngram_size)
    if beam_size > 1 and temperature > 0:
        raise UserError("beam search is deterministic: use temperature 0 with beam_size > 1, or beam_size 1 to sample")
    if pool is not None and pool < 1:
        raise UserError(f"pool must be at least 1 source, got {pool}")
    config = model.config
    pooled = pool is not None and pool < src_ids.size(0)
    if pooled and not (beam_size > 1 and can_pool(model, use_cache, no_repeat_ngram_size)):
        options = dict(max_new_tokens=max_new_tokens, beam_size=beam_size, length_penalty=length_penalty,
                       use_cache=use_cache, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       length_penalty_style=length_penalty_style, no_repeat_ngram_size=no_repeat_ngram_size)
        parts = [generate(model, src_ids[i:i + pool], **options) for i in range(0, src_ids.size(0), pool)]
        width = max(part.size(1) for part in parts)
        return torch.cat([padded(part, 1, width, config.pad_id) for part in parts])
    lengths = (src_ids != config.pad_id).sum(dim=1)  # (B,)
    if max_new_tokens is None:  # each source's own length + 50 in a pool, else the longest's
        max_new_tokens = lengths + 50 if pooled else int(lengths.max()) + 50
    max_new_tokens = torch.as_tensor(max_new_tokens).clamp(max=config.max_seq_len) if pooled \
        else min(max_new_tokens, config.max_seq_len)
    generator = None if seed is None else torch.Generator(device=src_ids.device).manual_seed(seed)
    was_training = model.training
    model.eval()  # dropout would make generation random (and cached ≠ uncached)
    try:
        if pooled:
            return beam_search(model, src_ids, max_new_tokens, beam_size, length_penalty,
                               length_penalty_style=length_penalty_style, pool=pool)
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
    log_probs = model(src_ids, shifted_right(model, out_ids)).float().log_softmax(dim=-1)
    token_log_probs = log_probs.gather(2, out_ids[:, :, None]).squeeze(2)  # (B, L)
    real = out_ids != config.pad_id
    lengths = real.sum(dim=1)
    lp = torch.tensor([length_penalty(int(n), alpha) for n in lengths], device=out_ids.device)
    return token_log_probs.masked_fill(~real, 0.0).sum(dim=1) / lp
