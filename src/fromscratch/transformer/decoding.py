"""Decoding a Transformer: greedy search and beam search, §6.1 of Vaswani et al. (2017).

    "We used beam search with a beam size of 4 and length penalty α = 0.6. … We set the
    maximum output length during inference to input length + 50, but terminate early when
    possible."

The length penalty is GNMT's (Wu et al. 2016, eq. 14): a hypothesis Y is ranked by
log P(Y | X) / lp(Y) with lp(Y) = ((5 + |Y|) / 6)^α, where |Y| counts its tokens including EOS.

Both searches ask a `NextToken` for log p(y_t | y_<t, X). With the cache it feeds the decoder
only the newest token (earlier positions' keys and values are kept, and the encoder output's
are projected once); without, it runs the decoder over the whole prefix again. Both give the
same tokens. The padding and BOS tokens are never generated.

Every function returns (B, L) token ids: no leading BOS, the EOS when one was produced, and
pad_id after it.
"""

import torch


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's lp(Y) = ((5 + |Y|) / 6)^α."""
    return ((5 + length) / 6) ** alpha


class NextToken:
    """log p(next token | prefix, source) for a batch of prefixes, with or without the cache."""

    def __init__(self, model, memory: torch.Tensor, src_mask: torch.Tensor, use_cache: bool):
        self.model, self.memory, self.src_mask = model, memory, src_mask
        self.cache = model.new_cache() if use_cache else None
        config = model.config
        self.never = torch.tensor([config.pad_id, config.bos_id], device=memory.device)

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix (N, t), starting with BOS → log-probabilities (N, vocab_size) of token t + 1."""
        new = prefix if self.cache is None else prefix[:, self.cache.length :]
        hidden = self.model.decode(new, self.memory, self.src_mask, self.cache)  # (N, T_new, d_model)
        log_probs = self.model.output_projection(hidden[:, -1]).float().log_softmax(dim=-1)
        return log_probs.index_fill(1, self.never, float("-inf"))

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index`: beam search moves each beam's state along with it."""
        self.memory, self.src_mask = self.memory.index_select(0, index), self.src_mask.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)


@torch.no_grad()
def greedy_decode(model, src_ids, max_new_tokens: int, use_cache: bool = True, stop_at_eos: bool = True):
    """Pick the most likely token at every step. src_ids (B, S) → (B, L), L ≤ max_new_tokens.
    stop_at_eos=False always runs max_new_tokens steps (for benchmarks)."""
    config = model.config
    memory, src_mask = model.encode(src_ids)
    next_token = NextToken(model, memory, src_mask, use_cache)
    tokens = torch.full((src_ids.size(0), 1), config.bos_id, dtype=torch.long, device=src_ids.device)
    finished = torch.zeros(src_ids.size(0), dtype=torch.bool, device=src_ids.device)
    for _ in range(max_new_tokens):
        token = next_token(tokens).argmax(dim=-1)  # (B,)
        token = token.masked_fill(finished, config.pad_id)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        if stop_at_eos:
            finished |= token == config.eos_id
            if finished.all():
                break
    return tokens[:, 1:]


@torch.no_grad()
def beam_search(model, src_ids, max_new_tokens: int, beam_size: int = 4, alpha: float = 0.6, use_cache: bool = True):
    """Keep the beam_size most probable prefixes of every source, batched. src_ids (B, S) → (B, L):
    each source's finished hypothesis of highest log P / lp; a source with none by
    max_new_tokens gets its best unfinished beam."""
    config = model.config
    batch, k = src_ids.size(0), beam_size
    device = src_ids.device
    memory, src_mask = model.encode(src_ids)
    # Beams live side by side in one batch of B·K rows: row b·K + j is beam j of source b.
    next_token = NextToken(model, memory.repeat_interleave(k, 0), src_mask.repeat_interleave(k, 0), use_cache)
    tokens = torch.full((batch * k, 1), config.bos_id, dtype=torch.long, device=device)
    beam_scores = torch.zeros(batch, k, device=device)  # log P of each beam's prefix
    beam_scores[:, 1:] = float("-inf")  # the K beams start identical: expand only the first
    first_row = torch.arange(batch, device=device)[:, None] * k  # (B, 1)

    best = torch.full((batch, max_new_tokens), config.pad_id, dtype=torch.long, device=device)
    best_scores = torch.full((batch,), float("-inf"), device=device)  # log P / lp of `best`
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for t in range(1, max_new_tokens + 1):  # t: hypothesis length after this step
        log_probs = next_token(tokens)  # (B·K, V)
        vocab = log_probs.size(1)
        scores = (beam_scores.view(-1, 1) + log_probs).view(batch, k * vocab)
        # Of the best 2K extensions at most K end in EOS, so at least K remain to continue.
        top_scores, top_index = scores.topk(2 * k, dim=1)  # (B, 2K)
        top_beams, top_tokens = top_index // vocab, top_index % vocab
        is_eos = top_tokens == config.eos_id

        # An EOS among the best K finishes a hypothesis; keep it if it beats the source's best.
        finished = torch.where(is_eos[:, :k], top_scores[:, :k] / length_penalty(t, alpha), float("-inf"))
        finished_score, j = finished.max(dim=1)  # (B,)
        improved = finished_score > best_scores
        if improved.any():
            rows = (first_row + top_beams.gather(1, j[:, None])).squeeze(1)
            eos = torch.full((batch, 1), config.eos_id, dtype=torch.long, device=device)
            hypotheses = torch.cat([tokens[rows, 1:], eos], dim=1)  # (B, t)
            best[improved, :t] = hypotheses[improved]
            best_scores = torch.where(improved, finished_score, best_scores)

        # The best K extensions that did not end are the next step's beams.
        beam_scores, i = top_scores.masked_fill(is_eos, float("-inf")).topk(k, dim=1)  # (B, K)
        rows = (first_row + top_beams.gather(1, i)).view(-1)
        tokens = torch.cat([tokens[rows], top_tokens.gather(1, i).view(-1, 1)], dim=1)
        next_token.reorder(rows)

        # A source is done when no beam can still beat its best: log P only falls as beams
        # grow, and lp grows at most to lp(max_new_tokens).
        done |= best_scores >= beam_scores[:, 0] / length_penalty(max_new_tokens, alpha)
        if done.all():
            break
    else:  # out of steps: the unfinished beams, now max_new_tokens long, compete too
        unfinished = beam_scores[:, 0] / length_penalty(max_new_tokens, alpha)
        improved = unfinished > best_scores
        best[improved] = tokens.view(batch, k, -1)[improved, 0, 1:]
    length = (best != config.pad_id).sum(dim=1).max()
    return best[:, :length]


@torch.no_grad()
def sequence_scores(model, src_ids, out_ids, alpha: float = 0.6) -> torch.Tensor:
    """The score beam search ranks by, log P(Y | X) / lp(Y), of outputs out_ids (B, L) as the
    functions above return them (no BOS; EOS, then padding, optional). Returns (B,)."""
    config = model.config
    bos = torch.full((out_ids.size(0), 1), config.bos_id, dtype=torch.long, device=out_ids.device)
    log_probs = model(src_ids, torch.cat([bos, out_ids[:, :-1]], dim=1)).float().log_softmax(dim=-1)
    token_log_probs = log_probs.gather(2, out_ids[:, :, None]).squeeze(2)  # (B, L)
    real = out_ids != config.pad_id
    lengths = real.sum(dim=1)
    lp = torch.tensor([length_penalty(int(n), alpha) for n in lengths], device=out_ids.device)
    return token_log_probs.masked_fill(~real, 0.0).sum(dim=1) / lp
