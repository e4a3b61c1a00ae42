"""Autoregressive decoding for Llama: greedy, temperature, top-k and nucleus (top-p) sampling.

Each step feeds the model only the newest token; the keys and values of earlier positions come
from a preallocated `KVCache`, so a step costs O(T) attention instead of recomputing the whole
prefix (O(T²)). `use_cache=False` recomputes everything and exists to prove the two agree.

Ragged batches are left-padded: every row's last prompt token then sits in the same column, so
one forward per step serves all rows. The model masks the padding and counts each row's
positions from its first real token, so every row decodes as it would alone.
"""

from collections.abc import Callable, Sequence

import torch

from fromscratch.errors import UserError
from fromscratch.llama.decode import PackedLlama


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to −∞. logits: (B, V)."""
    kth_largest = logits.topk(min(k, logits.size(-1)), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the most likely tokens until their total
    probability reaches p, set the rest to −∞. logits: (B, V).

    As in Meta's `sample_top_p`, a token is dropped when the tokens ranked above it already sum
    to more than p, so the most likely token always survives.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_above > p)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from (B, V) logits → (B,). temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _check_options(model, prompt_len: int, max_new_tokens: int, temperature, top_k, top_p):
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
    if temperature < 0:
        raise UserError(f"temperature must be ≥ 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be ≥ 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")


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
):
    """Extend each prompt by up to `max_new_tokens` tokens.

    input_ids: a (B, T) LongTensor → returns (B, T + n) LongTensor, n ≤ max_new_tokens (fewer
        only when every row has produced `eos_id`; rows that finished earlier are filled with it);
        or a list of token-id lists of any lengths → returns a list of lists (prompt + new
        tokens, each ending at its first `eos_id`, which is kept); or one list of ids → one list.
    temperature: 0 → greedy; otherwise logits are divided by it before top_k / top_p filtering.
    generator / seed: the source of randomness, for reproducible sampling.
    stream: called after every step with one new id per row (None for rows already finished).

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
        prompt_len = max(len(row) for row in rows)
        prompt = torch.tensor([[0] * (prompt_len - len(row)) + row for row in rows], device=device)
        pad = torch.tensor([prompt_len - len(row) for row in rows], device=device)
        pad_lengths = pad if pad.any() else None  # equal lengths need no mask
    else:
        if input_ids.dim() != 2:
            raise UserError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
        prompt, prompt_len, pad_lengths = input_ids.to(device), input_ids.size(1), None
    _check_options(model, prompt_len, max_new_tokens, temperature, top_k, top_p)
    if seed is not None:
        if generator is not None:
            raise UserError("give either seed or generator, not both")
        generator = torch.Generator(device=device).manual_seed(seed)

    batch_size = prompt.size(0)
    tokens = torch.empty(batch_size, prompt_len + max_new_tokens, dtype=torch.long, device=device)
    tokens[:, :prompt_len] = prompt
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    cache = model.new_cache(batch_size, prompt_len + max_new_tokens) if use_cache else None
    # On a CPU, steps after the prompt run on a copy of the weights laid out for one token at a
    # time (decode.py: ~2× faster, as memory-bound as the hardware allows); elsewhere, or when
    # the copy would be too large, they run Llama.forward with the cache.
    packed = PackedLlama.of(model) if use_cache and PackedLlama.suits(model) else None

    def next_token_logits(new_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens after those in the cache (all of them without one) → (B, vocab) logits."""
        if packed is not None and cache.length > 0:
            return packed.step(new_tokens[:, -1], cache, pad_lengths)
        h = model.hidden_states(new_tokens, cache=cache, pad_lengths=pad_lengths)[:, -1]
        return packed.logits(h) if packed is not None else model.output(h).float()

    was_training = model.training
    model.eval()  # no dropout while decoding
    try:
        end = prompt_len  # tokens[:, :end] are filled
        while end < prompt_len + max_new_tokens:
            if not use_cache or end == prompt_len:  # the whole sequence (fills the cache)
                logits = next_token_logits(tokens[:, :end])
            else:  # only the newest token; the cache holds the rest
                logits = next_token_logits(tokens[:, end - 1:end])
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_token = next_token.masked_fill(finished, eos_id)
            tokens[:, end] = next_token
            end += 1
            if stream is not None:
                stream([None if done else t for t, done in zip(next_token.tolist(), finished.tolist())])
            if eos_id is not None:
                finished |= next_token == eos_id
                if finished.all():
                    break
    finally:
        model.train(was_training)

    if not as_lists:
        return tokens[:, :end]
    out = []
    for row, n_pad in zip(tokens[:, :end].tolist(), pad.tolist()):
        row = row[n_pad:]
        if eos_id is not None and eos_id in row[prompt_len - n_pad:]:
            row = row[: row.index(eos_id, prompt_len - n_pad) + 1]
        out.append(row)
    return out[0] if single else out
