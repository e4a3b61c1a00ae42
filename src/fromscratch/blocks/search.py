"""Autoregressive decoding for every generator of the package: sampling (greedy included) and
beam search (§6.1 of Vaswani et al. 2017).

A model takes part through a *next-token function*: called with every token so far, (N, t), it
returns the float32 logits of token t + 1, (N, V), with the tokens it must never produce at −∞;
`reorder(rows, within_prompts)` keeps rows `rows` of its state (the KV cache, an encoder output,
image patches; only the cache when the rows stay within their prompts).
It decides itself how much to recompute: with a KV cache it feeds the model only the tokens after
those cached, without one it runs the whole prefix again. The Transformer (`transformer/decoding.py`),
Llama and the models built on it (`llama/generate.py`) and the image captioner each define one.

Both searches take a prompt (B, t₀) — a BOS column for the Transformer's decoder, the prompt
tokens for Llama — and stop at `eos_id` (None: never) or after `max_new_tokens`.

Beam search ranks finished hypotheses by log P(Y | X) / lp(|Y|) with GNMT's length penalty
lp(n) = ((5 + n) / 6)^α (Wu et al. 2016, eq. 14), |Y| counting its tokens including EOS;
§6.1 uses beam 4 and α = 0.6.

`length_penalty_style="hf"` reproduces Hugging Face transformers' beam search instead (its
`generate(num_beams=K, length_penalty=α)` with the default `early_stopping=False`), token for
token: lp(n) = n^α; a prompt keeps its K best finished hypotheses and is done once it has K of
them and its best running beam, scored at its current length, is no better than the worst (a
heuristic: a longer continuation could still have won); at the length limit the best K
candidates all count as finished, EOS or not. The tokens passed as `banned` are set to −∞ after
the log-softmax, as transformers' `bad_words_ids` does, so the others keep their unnormalised
log-probabilities.

Both searches can forbid repetition: with `no_repeat_ngram_size` n, a token that would complete an
n-gram its row already holds (prompt included) gets −∞, after the log-softmax in beam search and
on the logits in `sample`: transformers' `no_repeat_ngram_size` (`ban_repeated_ngrams`). A weak
model's beams otherwise fall into loops ("saya, saya, saya, …").

Beam search can keep its batch full (`pool` P): it searches P prompts at a time and, as soon as
one is done, gives its K rows to the next waiting prompt (`next_logits.admit`), which starts there
as K beams of which only the first counts. Searched in fixed batches instead, a batch thins out to
its last few prompts, and those steps cost nearly what a full one does (the weights are read
and the search's small operations launched either way). The prompts of one search then differ
in length, so the rows of `tokens` are right-aligned: a row's tokens are its last columns, pad_id
before them, and its next-token function (which must keep a KV cache) tells each row's position
from its own count of steps. Each prompt's search is the one it would have alone.
"""

import math
from collections.abc import Callable
from typing import Protocol

import torch

from fromscratch.blocks.sampling import sample_next_token
from fromscratch.errors import UserError

LENGTH_PENALTY_STYLES = ("gnmt", "hf")


class NextTokenLogits(Protocol):
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, t), every token so far → float32 logits (N, V) of token t + 1."""

    def reorder(self, rows: torch.Tensor, within_prompts: bool = False) -> None:
        """Keep rows `rows` (N',) of the state, in that order (rows may repeat). within_prompts:
        every row is replaced by a row of the same prompt (beam search after its first step), so
        what is per prompt — an encoder output, image patches, padding — need not move."""

    def admit(self, rows: torch.Tensor, prompts: torch.Tensor) -> None:
        """Only for beam search's `pool`: prompts `prompts` (n,) start in rows `rows` (n·K,), K
        rows each, in place of prompts that are done. Their next step is their first token."""


def sample(next_logits: NextTokenLogits, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
           eos_id: int | None = None, fill_id: int | None = None,
           stream: Callable[[list[int | None]], None] | None = None, no_repeat_ngram_size: int = 0) -> torch.Tensor:
    """Extend every row of `prompt` (B, t₀) token by token: greedy when temperature is 0, else
    sampled with temperature / top-k / top-p (`sample_next_token`), never repeating an n-gram
    of `no_repeat_ngram_size` tokens when that is over 0.

    A row that has produced `eos_id` is finished: its later positions hold `fill_id` (default
    `eos_id`), and decoding stops once every row is finished. `stream` is called after every step
    with one new id per row (None for rows finished before it).
    Returns (B, t₀ + n) with n ≤ max_new_tokens.
    """
    batch, prompt_len = prompt.shape
    fill_id = eos_id if fill_id is None else fill_id
    tokens = prompt.new_empty(batch, prompt_len + max_new_tokens)
    tokens[:, :prompt_len] = prompt
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    end = prompt_len  # tokens[:, :end] are filled
    while end < prompt_len + max_new_tokens:
        logits = next_logits(tokens[:, :end])  # (B, V)
        if no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits.clone(), tokens[:, :end], no_repeat_ngram_size)
        token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_id is not None:
            token = token.masked_fill(finished, fill_id)
        tokens[:, end] = token
        end += 1
        if stream is not None:
            stream([None if done else t for t, done in zip(token.tolist(), finished.tolist())])
        if eos_id is not None:
            finished |= token == eos_id
            if finished.all():
                break
    return tokens[:, :end]


def check_generation_inputs(ids: torch.Tensor, vocab_size: int, beam_size: int, max_new_tokens: int | None,
                            what: str = "input_ids") -> None:
    """What a model's `generate` takes, checked before an embedding lookup or a tensor shape fails
    on it with a message that names neither: `ids` a (batch, time) tensor of integer token ids in
    [0, vocab_size), `beam_size` a whole number, `max_new_tokens` a whole number ≥ 0 (or None)."""
    whole = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    if not whole(beam_size):
        raise TypeError(f"beam_size must be a whole number, got {beam_size!r}")
    if max_new_tokens is not None and not (whole(max_new_tokens) and max_new_tokens >= 0):
        raise UserError(f"max_new_tokens must be a whole number ≥ 0, got {max_new_tokens!r}")
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{what} must be a tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer token ids, got {ids.dtype}")
    if ids.dim() != 2:
        raise UserError(f"{what} must be (batch, time), got shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise UserError(f"{what} holds ids from {int(ids.min())} to {int(ids.max())}, outside the model's "
                        f"vocabulary of {vocab_size} (0 to {vocab_size - 1})")


def check_ngram_size(n: int, name: str = "no_repeat_ngram_size") -> None:
    """Refuse a negative `no_repeat_ngram_size` (0 is off) before any work; `name` is how the
    caller calls it (a CLI flag, an argument)."""
    if n < 0:
        raise UserError(f"{name} must be 0 (off) or more, got {n}")


def ban_repeated_ngrams(scores: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Set to −∞, in place, the scores (N, V) of each row's tokens that would complete an n-gram
    (n ≥ 1) already in the row's tokens (N, t); returns `scores`."""
    t = tokens.size(1)
    if n < 1 or t < n:
        return scores
    ngrams = tokens.unfold(1, n, 1)  # (N, t − n + 1, n): every n-gram so far
    tail = tokens[:, t - n + 1:]  # (N, n − 1): what the next token would complete
    repeats = (ngrams[:, :, :-1] == tail[:, None, :]).all(dim=2)  # (N, t − n + 1)
    rows, where = repeats.nonzero(as_tuple=True)
    scores[rows, ngrams[rows, where, -1]] = float("-inf")
    return scores


def shared_rows(rows: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """Which rows of a prompt's shared state (an encoder output, image patches: one row read by
    `group` consecutive search rows, see `scaled_dot_product_attention`) the search rows `rows`
    (N',) of a `reorder` read, and their new group size. Beam search keeps each prompt's beams
    consecutive and equally many, so it keeps one row per prompt; rows in any other order get
    a row each (group 1)."""
    sources = rows // group  # the shared row each new search row reads
    _, counts = torch.unique_consecutive(sources, return_counts=True)
    new_group = int(counts[0]) if bool((counts == counts[0]).all()) else 1
    return sources[::new_group], new_group


def stable_slots(parents: torch.Tensor) -> torch.Tensor:
    """Where beam search puts its new beams: parents (b, K), the beam (0..K−1) that each new beam
    extends, best first → slots (b, K), the new beam that goes into each beam's row.
    The best new beam of each parent stays in the parent's row; the others take the rows of
    parents that have no new beam, in order. Rows that keep their beam's state need not move it
    (`KVCache.reorder` copies only the rows that change)."""
    b, k = parents.shape
    order = torch.arange(k, device=parents.device)
    same_parent = parents[:, :, None] == parents[:, None, :]  # (b, K, K)
    first_child = ~(same_parent & (order[None, :] < order[:, None])).any(dim=2)  # (b, K)
    kept = ((parents[:, :, None] == order) & first_child[:, :, None]).any(dim=1)  # (b, K): rows kept
    free_rows = (kept.long() * k + order).argsort(dim=1)  # rows not kept first, in order
    rank_among_others = ((~first_child).long().cumsum(dim=1) - 1).clamp(min=0)
    row = torch.where(first_child, parents, free_rows.gather(1, rank_among_others))  # (b, K): each beam's row
    return torch.empty_like(row).scatter_(1, row, order.expand(b, k))


def gnmt_length_penalty(length: int | torch.Tensor, alpha: float) -> float | torch.Tensor:
    """GNMT's lp(Y) = ((5 + |Y|) / 6)^α (of one length, or of a tensor of them)."""
    return ((5 + length) / 6) ** alpha


def hf_length_penalty(length: int | torch.Tensor, alpha: float) -> float | torch.Tensor:
    """transformers' lp(Y) = |Y|^α (α is its `length_penalty`, 1.0 by default)."""
    return length**alpha


@torch.no_grad()
def beam_search(next_logits: NextTokenLogits, prompt: torch.Tensor, max_new_tokens: int | torch.Tensor,
                beam_size: int = 4, alpha: float = 0.6, eos_id: int | None = None, pad_id: int = 0,
                length_penalty_style: str = "gnmt", banned: torch.Tensor | None = None,
                no_repeat_ngram_size: int = 0, pool: int | None = None) -> torch.Tensor:
    """Keep the `beam_size` most probable continuations of every prompt, all prompts batched.

    prompt (B, t₀) → (B, L): each prompt's finished hypothesis of highest log P / lp (the new
    tokens only, EOS included, right-padded with pad_id); a prompt with none finished after its
    `max_new_tokens` (one number, or (B,) one per prompt) gets its best unfinished beam.
    `length_penalty_style` "gnmt" or "hf", `banned` (token ids never produced) and
    `no_repeat_ngram_size` are explained in the module docstring.

    pool: search at most `pool` prompts at a time (None: all). When a prompt is done, the next
    waiting one takes its rows (`next_logits.admit`, module docstring), so that the batch stays
    full instead of thinning out to its slowest prompts; the translations are the same.
    """
    if not math.isfinite(alpha):  # NaN would rank every hypothesis NaN, and none would ever win
        raise UserError(f"the length penalty α must be a finite number, got {alpha}")
    if length_penalty_style not in LENGTH_PENALTY_STYLES:
        raise UserError(f"length_penalty_style {length_penalty_style!r}: "
                        f"choose one of {', '.join(LENGTH_PENALTY_STYLES)}")
    hf = length_penalty_style == "hf"
    lp = hf_length_penalty if hf else gnmt_length_penalty

    batch, k, device = prompt.size(0), beam_size, prompt.device
    limits = torch.as_tensor(max_new_tokens, device=device).expand(batch)  # (B,) new tokens allowed
    longest = int(limits.max()) if batch else 0
    if longest == 0:
        return prompt.new_empty(batch, 0)
    if bool((limits < 1).any()):
        raise ValueError("each prompt's max_new_tokens must be at least 1 when another's is more")

    def penalty(lengths: torch.Tensor) -> torch.Tensor:
        """(b,) lengths → (b,) lp: in float64 then rounded to float32, so that dividing by it
        gives what dividing by lp as a Python float gives (the hf style matches transformers)."""
        return lp(lengths.double(), alpha).float()

    def step_candidates(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's 2K most probable next tokens, (N, c) log-probabilities and (N, c) ids:
        the best 2K extensions of a prompt's K beams are among its beams' 2K best each."""
        log_probs = next_logits(tokens).log_softmax(dim=-1)  # (N, V), a new tensor
        if banned is not None:
            log_probs.index_fill_(1, banned, float("-inf"))
        if no_repeat_ngram_size:
            ban_repeated_ngrams(log_probs, tokens, no_repeat_ngram_size)
        return log_probs.topk(min(2 * k, log_probs.size(1)), dim=1)

    def beams_of(blocks: torch.Tensor) -> torch.Tensor:  # (b,) row blocks → (b·K,) their rows
        return (blocks[:, None] * k + torch.arange(k, device=device)).view(-1)

    # Prompts being searched: `active[i]` is the prompt of row block i, rows i·K to i·K + K − 1
    # its K beams side by side; `waiting` prompts join as others finish.
    n_first = batch if pool is None else min(pool, batch)
    active, waiting = torch.arange(n_first, device=device), n_first
    # Each prompt goes through the model once; then each becomes K beams.
    candidate_scores, candidate_tokens = step_candidates(prompt[:n_first])  # (b, c)
    expand = active.repeat_interleave(k)
    next_logits.reorder(expand)
    candidate_scores, candidate_tokens, tokens = candidate_scores[expand], candidate_tokens[expand], prompt[expand]
    beam_scores = torch.zeros(n_first, k, device=device)  # log P of each beam's continuation
    beam_scores[:, 1:] = float("-inf")  # the K beams start identical: expand only the first
    first_row = torch.arange(n_first, device=device)[:, None] * k  # (b, 1)
    start = prompt.size(1)
    # Tokens generated by each prompt's beams; a row's tokens are the last `start + lengths`
    # columns of `tokens` (a prompt that joined later has pad_id before its own).
    lengths = torch.zeros(n_first, dtype=torch.long, device=device)

    best = torch.full((batch, longest), pad_id, dtype=torch.long, device=device)
    best_scores = torch.full((batch,), float("-inf"), device=device)  # log P / lp of `best`
    best_lengths = torch.zeros(batch, dtype=torch.long, device=device)
    kept_scores = torch.full((n_first, k), float("-inf"), device=device)  # "hf": the K best finished, best first
    steps = 0
    while True:
        if steps:
            candidate_scores, candidate_tokens = step_candidates(tokens)  # (b·K, c), b = len(active)
        steps += 1
        lengths += 1  # each hypothesis's length after this step
        limit = limits[active]
        n_active, c = len(active), candidate_scores.size(1)
        scores = (beam_scores.view(-1, 1) + candidate_scores).view(n_active, k * c)
        # Of the best 2K extensions at most K end in EOS, so at least K remain to continue.
        top_scores, top_index = scores.topk(2 * k, dim=1)  # (b, 2K)
        top_beams, top_tokens = top_index // c, candidate_tokens.view(n_active, k * c).gather(1, top_index)
        is_eos = top_tokens == eos_id if eos_id is not None else torch.zeros_like(top_tokens, dtype=torch.bool)
        at_limit = lengths == limit  # (b,)

        # An EOS among the best K finishes a hypothesis; keep it if it beats the prompt's best.
        ends = is_eos[:, :k]
        if hf:  # at the length limit all of the best K end
            ends = ends | at_limit[:, None]
        finished = torch.where(ends, top_scores[:, :k] / penalty(lengths)[:, None], float("-inf"))
        finished_score, j = finished.max(dim=1)  # (b,)
        improved = finished_score > best_scores[active]
        if improved.any():
            rows = (first_row + top_beams.gather(1, j[:, None])).squeeze(1)
            last = top_tokens.gather(1, j[:, None])  # EOS (or, "hf" at the limit, the last token)
            hypotheses = torch.cat([tokens[rows], last], dim=1)[improved]  # each one's last `lengths` columns
            keep_best(best, best_scores, best_lengths, active[improved], hypotheses, lengths[improved],
                      finished_score[improved], pad_id)
        if hf:
            kept_scores = torch.cat([kept_scores, finished], dim=1).topk(k, dim=1).values

        # The best K extensions that did not end are the next step's beams, each in the row of
        # the beam it extends where it can (so that little of the state moves).
        beam_scores, i = top_scores.masked_fill(is_eos, float("-inf")).topk(k, dim=1)  # (b, K)
        parents = top_beams.gather(1, i)
        slots = stable_slots(parents)
        beam_scores, i, parents = beam_scores.gather(1, slots), i.gather(1, slots), parents.gather(1, slots)
        rows = (first_row + parents).view(-1)
        tokens = torch.cat([tokens[rows], top_tokens.gather(1, i).view(-1, 1)], dim=1)
        next_logits.reorder(rows, within_prompts=True)

        if hf:  # transformers' heuristic: K finished, and the best beam at its length no better than the worst
            worst = kept_scores[:, -1]
            done = (worst > float("-inf")) & (beam_scores.max(dim=1).values / penalty(lengths) <= worst)
        else:
            # A prompt is done when no beam can still beat its best: log P only falls as beams
            # grow, and lp grows at most to lp(limit). At its limit, its best unfinished beam
            # competes too ("hf": all of the best K have, above).
            top_beam_scores, top_beam = beam_scores.max(dim=1)
            done = best_scores[active] >= top_beam_scores / penalty(limit)
            unfinished = torch.where(at_limit, top_beam_scores / penalty(limit), float("-inf"))
            improved = unfinished > best_scores[active]
            if improved.any():
                rows = (first_row.squeeze(1) + top_beam)[improved]
                keep_best(best, best_scores, best_lengths, active[improved], tokens[rows], limit[improved],
                          unfinished[improved], pad_id)
        done |= at_limit
        if done.any():
            # Done prompts free their rows: the waiting prompts take them, in order, and start as
            # K beams of which only the first counts; rows still free then leave the batch.
            joining = done.nonzero().squeeze(1)[:batch - waiting]
            if len(joining):
                prompts = torch.arange(waiting, waiting + len(joining), device=device)
                waiting += len(joining)
                rows = beams_of(joining)
                next_logits.admit(rows, prompts)
                active[joining], lengths[joining], done[joining] = prompts, 0, False
                beam_scores[joining] = beam_scores.new_tensor([0.0] + [float("-inf")] * (k - 1))
                kept_scores[joining] = float("-inf")
                tokens[rows] = pad_id
                tokens[rows, tokens.size(1) - start:] = prompt[prompts].repeat_interleave(k, dim=0)
            if done.all():
                break
            if done.any():  # the done prompts leave; nothing they hold can change any more
                keep = (~done).nonzero().squeeze(1)  # (b',)
                keep_rows = beams_of(keep)
                next_logits.reorder(keep_rows)
                tokens, beam_scores, kept_scores = tokens[keep_rows], beam_scores[keep], kept_scores[keep]
                active, lengths = active[keep], lengths[keep]
                first_row = torch.arange(len(active), device=device)[:, None] * k
        tokens = tokens[:, -(start + int(lengths.max())):]  # the columns some row still needs
    return best[:, :int(best_lengths.max())]


def keep_best(best: torch.Tensor, best_scores: torch.Tensor, best_lengths: torch.Tensor, prompts: torch.Tensor,
              rows: torch.Tensor, lengths: torch.Tensor, scores: torch.Tensor, pad_id: int) -> None:
    """Store, for `prompts` (n,), the hypotheses that are the last `lengths` (n,) tokens of `rows`
    (n, W), and their scores: into best (B, L) at the start of each row, pad_id after."""
    width = rows.size(1)
    position = torch.arange(best.size(1), device=rows.device)
    taken = width - lengths[:, None] + position  # (n, L): column of rows for each position of best
    hypotheses = rows.gather(1, taken.clamp(max=width - 1)).masked_fill(position >= lengths[:, None], pad_id)
    best[prompts] = hypotheses
    best_scores[prompts] = scores
    best_lengths[prompts] = lengths
