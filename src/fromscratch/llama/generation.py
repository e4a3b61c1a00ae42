"""Autoregressive decoding for Llama (and the models built on it): greedy, temperature, top-k,
nucleus (top-p) sampling, and beam search.

The searches are the package's shared ones (`fromscratch.blocks.search`); what is Llama's is
`LlamaNextToken`. Each step feeds the model only the newest token; the keys and values of
earlier positions come from a preallocated `KVCache`, so a step costs O(T) attention instead of
recomputing the whole prefix (O(T²)). `use_cache=False` recomputes everything and exists to
prove the two agree. A model accelerated by `fast.accelerate` decodes its one-token steps on a
packed copy of the weights (`model.decode_step`); this module works the same either way.

Ragged batches are left-padded: every row's last prompt token then sits in the same column, so
one forward per step serves all rows. The model masks the padding and counts each row's
positions from its first real token, so every row decodes as it would alone.
"""

from collections.abc import Callable, Sequence

import torch

from fromscratch.blocks import beam_search, check_sampling_options, sample
from fromscratch.blocks.search import check_generation_inputs, check_ngram_size
from fromscratch.errors import UserError


class LlamaNextToken:
    """Logits of the next token for a batch of (left-padded) prompts as they grow."""

    def __init__(self, model, batch_size: int, max_len: int, pad_lengths: torch.Tensor | None, use_cache: bool):
        self.model, self.pad_lengths = model, pad_lengths
        self.cache = model.new_cache(batch_size, max_len) if use_cache else None
        # The packed one-token step (fast.py), its weights checked once for the whole search.
        self.decode_step = model.decode_step.for_one_search() if use_cache and model.decode_step is not None else None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, t), every token so far → float32 logits (B, vocab_size) of token t + 1."""
        model, cache = self.model, self.cache
        if cache is None:
            return model(tokens, pad_lengths=self.pad_lengths)[:, -1]
        new = tokens[:, cache.length:]
        if self.decode_step is not None and cache.length > 0 and new.size(1) == 1:
            return self.decode_step(new[:, 0], cache, self.pad_lengths)
        return model(new, cache=cache, pad_lengths=self.pad_lengths)[:, -1]

    def reorder(self, rows: torch.Tensor, within_prompts: bool = False) -> None:
        if self.cache is not None:
            self.cache.reorder(rows)
        if self.pad_lengths is not None and not within_prompts:  # the same for every beam of a prompt
            self.pad_lengths = self.pad_lengths[rows]


def _check_lengths(model, prompt_len: int, max_new_tokens: int) -> None:
    max_seq_len = model.config.max_seq_len
    if prompt_len == 0:
        raise UserError("the prompt is empty: give at least one token (e.g. the BOS id)")
    if prompt_len > max_seq_len:
        raise UserError(f"the prompt has {prompt_len} tokens but the model's max_seq_len is {max_seq_len}")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    if prompt_len + max_new_tokens > max_seq_len:
        raise UserError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{prompt_len + max_new_tokens} exceeds the model's max_seq_len {max_seq_len}; "
            f"ask for at most {max_seq_len - prompt_len} new tokens"
        )


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    stream: Callable[[list[int | None]], None] | None = None,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
):
    """Extend each prompt by up to `max_new_tokens` tokens.

    input_ids: a (B, T) LongTensor → returns (B, T + n) LongTensor, n ≤ max_new_tokens (fewer
        only when every row has produced `eos_id`; rows that finished earlier are filled with it);
        or a list of token-id lists of any lengths → returns a list of lists (prompt + new
        tokens, each ending at its first `eos_id`, which is kept); or one list of ids → one list.
    temperature: 0 → greedy; otherwise logits are divided by it before top_k / top_p filtering.
    generator / seed: the source of randomness, for reproducible sampling.
    stream: called after every step with one new id per row (None for rows already finished).
    beam_size > 1: beam search instead (deterministic; ranked by log P / lp with GNMT's length
        penalty α = length_penalty), returning each prompt's best continuation.
    no_repeat_ngram_size n > 0: never produce a token that completes an n-gram already in the
        row, prompt included (transformers' `no_repeat_ngram_size`; blocks/search.py). Prompts
        of different lengths are left-padded with id 0, which takes part in the n-grams as
        transformers' padding does.

    Raises UserError when prompt + max_new_tokens does not fit in the model's max_seq_len.
    """
    device = model.tok_embeddings.weight.device
    single = (isinstance(input_ids, Sequence) and len(input_ids) > 0
              and not isinstance(input_ids[0], (Sequence, torch.Tensor)))  # one prompt of ints
    as_lists = not isinstance(input_ids, torch.Tensor)
    if as_lists:
        rows = [list(input_ids)] if single else [list(row) for row in input_ids]
        if not rows or any(len(row) == 0 for row in rows):
            raise UserError("every prompt needs at least one token (e.g. the BOS id)")
        if not all(isinstance(t, int) and not isinstance(t, bool) for row in rows for t in row):
            raise TypeError("prompts must be token ids (ints); encode text with the tokenizer first")
        prompt_len = max(len(row) for row in rows)
        prompt = torch.tensor([[0] * (prompt_len - len(row)) + row for row in rows], device=device)
        pad = torch.tensor([prompt_len - len(row) for row in rows], device=device)
        pad_lengths = pad if pad.any() else None  # equal lengths need no mask
    else:
        if input_ids.dim() != 2:
            raise UserError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
        prompt, prompt_len, pad_lengths = input_ids.to(device), input_ids.size(1), None
    check_generation_inputs(prompt, model.config.vocab_size, beam_size, max_new_tokens)
    _check_lengths(model, prompt_len, max_new_tokens)
    check_sampling_options(temperature, top_k, top_p)
    if beam_size < 1:
        raise UserError(f"beam_size must be at least 1, got {beam_size}")
    check_ngram_size(no_repeat_ngram_size)
    if beam_size > 1 and stream is not None:
        raise UserError("beam search cannot stream: its best hypothesis is known only at the end")
    if seed is not None:
        if generator is not None:
            raise UserError("give either seed or generator, not both")
        generator = torch.Generator(device=device).manual_seed(seed)

    next_token = LlamaNextToken(model, prompt.size(0), prompt_len + max_new_tokens, pad_lengths, use_cache)
    was_training = model.training
    model.eval()  # no dropout while decoding
    try:
        if beam_size > 1:
            new = beam_search(next_token, prompt, max_new_tokens, beam_size, length_penalty, eos_id=eos_id,
                              pad_id=eos_id if eos_id is not None else 0, no_repeat_ngram_size=no_repeat_ngram_size)
            tokens = torch.cat([prompt, new], dim=1)
        else:
            tokens = sample(next_token, prompt, max_new_tokens, temperature, top_k, top_p, generator,
                            eos_id=eos_id, stream=stream, no_repeat_ngram_size=no_repeat_ngram_size)
    finally:
        model.train(was_training)

    if not as_lists:
        return tokens
    out = []
    for row, n_pad in zip(tokens.tolist(), pad.tolist()):
        row = row[n_pad:]
        if eos_id is not None and eos_id in row[prompt_len - n_pad:]:
            row = row[: row.index(eos_id, prompt_len - n_pad) + 1]
        out.append(row)
    return out[0] if single else out
