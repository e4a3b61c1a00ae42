"""The shared KV cache (growing, preallocated, static) and the shared searches (sampling, beam
search), checked on their own, away from any model: a toy next-token function whose best
sequence can be found by enumeration."""

import itertools
import math

import pytest
import torch

from fromscratch.blocks import KVCache, beam_search, gnmt_length_penalty, sample, scaled_dot_product_attention
from fromscratch.blocks.search import ban_repeated_ngrams, stable_slots
from fromscratch.errors import UserError


def _steps(n_steps=5, batch=2, heads=2, head_dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, heads, 1, head_dim, generator=generator),
             torch.randn(batch, heads, 1, head_dim, generator=generator)) for _ in range(n_steps)]


@pytest.mark.parametrize("max_len", [None, 8])
def test_growing_and_preallocated_caches_hold_the_same_keys(max_len):
    steps = _steps()
    cache = KVCache(n_layers=2, max_len=max_len)
    for k, v in steps:
        for layer in range(2):
            keys, values = cache.update(layer, k, v)
        cache.advance(1)
    assert cache.length == 5 and keys.shape == (2, 2, 5, 4)
    torch.testing.assert_close(keys, torch.cat([k for k, _ in steps], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat([v for _, v in steps], dim=2), rtol=0, atol=0)


def test_preallocated_cache_refuses_to_overflow_and_is_sized_up_front():
    cache = KVCache(n_layers=3, max_len=4).allocate(batch_size=2, n_kv_heads=2, head_dim=4)
    assert cache.nbytes == 2 * 3 * 2 * 2 * 4 * 4 * 4  # keys and values, layers, B, heads, T, d, float32
    k, v = torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 3, 4)
    cache.update(0, k, v)
    cache.advance(3)
    with pytest.raises(UserError, match="overflow a KV cache of 4"):
        cache.update(0, k[:, :, :2], v[:, :, :2])


def test_reorder_moves_and_repeats_rows_and_static_cache_keeps_its_context():
    steps = _steps(n_steps=3, batch=3)
    cache = KVCache(n_layers=1, max_len=5)
    for k, v in steps:
        cache.update(0, k, v)
        cache.advance(1)
    rows = torch.tensor([2, 2, 0])
    expected = torch.cat([k for k, _ in steps], dim=2)[rows]
    cache.reorder(rows)
    k, v = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    keys, _ = cache.update(0, k, v)
    torch.testing.assert_close(keys[:, :, :3], expected, rtol=0, atol=0)
    static = KVCache(n_layers=2, static=True)
    assert not static.holds(1)
    memory = torch.randn(3, 2, 7, 4)
    static.update(1, memory, memory)
    assert static.holds(1) and not static.holds(0) and static.keys[1] is memory


def test_preallocated_reorders_copy_only_the_rows_that_change_in_place(monkeypatch):
    """A reorder copies the filled positions of the rows whose content changes and no others,
    in the same buffer (swaps and repeats included: sources are read before targets are
    written); rows that leave narrow it to its first rows, more rows grow it; every key exact."""
    copied = []
    index_copy = torch.Tensor.index_copy_
    monkeypatch.setattr(torch.Tensor, "index_copy_",
                        lambda self, dim, index, source: copied.append(index.tolist()) or index_copy(self, dim, index, source))
    steps = _steps(n_steps=4, batch=4)
    cache = KVCache(n_layers=1, max_len=6)
    expected = torch.cat([k for k, _ in steps], dim=2)  # (4, 2, 4, 4)
    expected_values = torch.cat([v for _, v in steps], dim=2)
    for k, v in steps:
        cache.update(0, k, v)
        cache.advance(1)
    first = cache.keys[0].data_ptr()
    for rows, changed in (([3, 3, 1, 0], [0, 1, 2, 3]), ([1, 0, 2, 2], [0, 1, 3]), ([0, 1, 3, 3], [2]),
                          ([0, 1, 2, 3], [])):
        copied.clear()
        rows = torch.tensor(rows)
        cache.reorder(rows)
        expected, expected_values = expected[rows], expected_values[rows]
        torch.testing.assert_close(cache.keys[0][:, :, :4], expected, rtol=0, atol=0)
        torch.testing.assert_close(cache.values[0][:, :, :4], expected_values, rtol=0, atol=0)
        assert copied == ([changed, changed] if changed else [])  # keys, then values
        assert cache.keys[0].data_ptr() == first
    cache.reorder(torch.tensor([2, 0]))  # two rows leave: a view of the first two rows
    torch.testing.assert_close(cache.keys[0][:, :, :4], expected[[2, 0]], rtol=0, atol=0)
    assert cache.keys[0].shape == (2, 2, 6, 4) and cache.keys[0].data_ptr() == first
    keys, _ = cache.update(0, torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4))
    expected = torch.cat([expected[[2, 0]], torch.ones(2, 2, 1, 4)], dim=2)
    torch.testing.assert_close(keys, expected, rtol=0, atol=0)
    cache.advance(1)
    cache.reorder(torch.tensor([1, 1, 0]))  # more rows than the buffer has: a new one
    torch.testing.assert_close(cache.keys[0][:, :, :5], expected[[1, 1, 0]], rtol=0, atol=0)
    assert cache.keys[0].shape == (3, 2, 6, 4)


def test_rows_of_different_lengths_each_attend_to_their_own_positions():
    """Rows that start at different steps (beam search's pool, where a prompt takes the row of one
    that is done): each row's new key goes after its own, what an earlier occupant left is masked
    out, and each row's attention equals attention over its own keys alone."""
    batch, heads, head_dim, joins = 3, 2, 4, (0, 2, 3)  # the step at which each row's sequence starts
    cache = KVCache(1, max_len=6)
    cache.row_lengths = torch.zeros(batch, dtype=torch.long)
    own = [[] for _ in range(batch)]
    generator = torch.Generator().manual_seed(5)
    for step, (k, v) in enumerate(_steps(n_steps=6, batch=batch, heads=heads, head_dim=head_dim)):
        for row, join in enumerate(joins):
            if step == join:
                cache.row_lengths[row], own[row] = 0, []
        query = torch.randn(batch, heads, 1, head_dim, generator=generator)
        keys, values = cache.update(0, k, v)
        got = scaled_dot_product_attention(query, keys, values, cache.row_mask())
        cache.advance(1)
        for row in range(batch):
            own[row].append((k[row], v[row]))
            alone = scaled_dot_product_attention(query[row:row + 1], torch.cat([k for k, _ in own[row]], dim=1)[None],
                                                 torch.cat([v for _, v in own[row]], dim=1)[None])
            torch.testing.assert_close(got[row:row + 1], alone)
    assert cache.row_lengths.tolist() == [6, 4, 3] and cache.length == 6
    before = cache.keys[0].clone()
    cache.reorder(torch.tensor([2, 0, 0]))  # each moved row takes the positions its source holds
    assert cache.row_lengths.tolist() == [3, 6, 6]
    for row, source in enumerate((2, 0, 0)):
        n = cache.row_lengths[row]
        assert torch.equal(cache.keys[0][row, :, :n], before[source, :, :n])
    # `length` stays the most any row holds when the longest rows start again or leave (a step
    # checks the model's context against it, and attends over that many positions).
    cache.restart_rows(torch.tensor([1, 2]))
    assert cache.row_lengths.tolist() == [3, 0, 0] and cache.length == 3
    cache.reorder(torch.tensor([1, 2]))
    assert cache.row_lengths.tolist() == [0, 0] and cache.length == 0
    with pytest.raises(ValueError, match="one position at a time"):
        cache.update(0, torch.zeros(3, heads, 2, head_dim), torch.zeros(3, heads, 2, head_dim))


def test_attention_over_the_cache_equals_attention_over_the_whole_sequence():
    """One query at a time against the cached keys = causal attention over all positions."""
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    full = scaled_dot_product_attention(q, k, v, is_causal=True)
    cache = KVCache(n_layers=1)
    steps = []
    for t in range(6):
        keys, values = cache.update(0, k[:, :, t:t + 1], v[:, :, t:t + 1])
        cache.advance(1)
        steps.append(scaled_dot_product_attention(q[:, :, t:t + 1], keys, values, is_causal=True))
    torch.testing.assert_close(torch.cat(steps, dim=2), full, atol=1e-6, rtol=1e-6)


# --- searches ---------------------------------------------------------------------------------------


class MarkovChain:
    """A next-token function over a fixed table: logits of token t+1 depend only on token t.
    Token 0 is EOS. Rows are tracked so that reorder is checked to move state with the beams."""

    def __init__(self, table: torch.Tensor, batch_size: int):
        self.table, self.rows = table, torch.arange(batch_size)
        self.calls: list[int] = []

    def __call__(self, tokens):
        self.calls.append(tokens.size(1))
        assert tokens.size(0) == len(self.rows)
        return self.table[tokens[:, -1]].clone()

    def reorder(self, rows, within_prompts=False):
        self.rows = self.rows[rows]


def _table(vocab=5, seed=0):
    return torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def _log_prob(table, sequence):
    log_probs = table.log_softmax(-1)
    return sum(log_probs[a, b].item() for a, b in zip(sequence, sequence[1:]))


def test_greedy_sampling_takes_the_argmax_and_fills_finished_rows():
    table = _table(vocab=10)
    table[:, 9] = float("-inf")  # the fill token is never chosen, only written
    prompt = torch.tensor([[1], [3]])
    seen = []
    tokens = sample(MarkovChain(table, 2), prompt, max_new_tokens=6, temperature=0, eos_id=0, fill_id=9,
                    stream=seen.append)
    for row in tokens.tolist():
        for t in range(1, len(row)):
            if row[t - 1] in (0, 9):
                assert row[t] == 9  # after EOS: the fill token
            else:
                assert row[t] == int(table[row[t - 1]].argmax())
    assert len(seen) == tokens.size(1) - 1 and all(len(step) == 2 for step in seen)


def test_sampling_is_reproducible_with_a_generator():
    table = _table()
    prompt = torch.tensor([[1], [2]])
    draw = lambda seed: sample(MarkovChain(table, 2), prompt, 8, temperature=1.0,  # noqa: E731
                               generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_beam_search_finds_the_exact_best_sequence_of_a_small_space(alpha):
    """With a beam as wide as the vocabulary, every prefix of length ≤ 3 is kept: the result is the
    best of all sequences by log P / lp, found by enumeration."""
    vocab, max_new = 4, 3
    for seed in range(5):
        table = _table(vocab, seed)
        prompt = torch.tensor([[2], [3]])
        got = beam_search(MarkovChain(table, 2), prompt, max_new, beam_size=vocab, alpha=alpha, eos_id=0, pad_id=0)
        for b, start in enumerate((2, 3)):
            candidates = []
            for n in range(1, max_new + 1):
                for seq in itertools.product(range(vocab), repeat=n):
                    if 0 in seq[:-1] or (n < max_new and seq[-1] != 0):
                        continue  # EOS only at the end; shorter sequences must have ended
                    score = _log_prob(table, (start, *seq)) / gnmt_length_penalty(n, alpha)
                    candidates.append((score, list(seq)))
            best_score, best = max(candidates)
            row = got[b].tolist()
            row = row[: row.index(0) + 1] if 0 in row else row
            got_score = _log_prob(table, [start, *row]) / gnmt_length_penalty(len(row), alpha)
            assert math.isclose(got_score, best_score, abs_tol=1e-5), (seed, row, best)


def test_beam_search_runs_the_prompt_once_then_expands_to_beams():
    chain = MarkovChain(_table(), 2)
    beam_search(chain, torch.tensor([[1, 2, 3], [2, 3, 4]]), 4, beam_size=3, eos_id=None)
    assert chain.calls[0] == 3 and len(chain.rows) == 6  # 2 prompts → 2·3 beams


# --- the "hf" style: transformers' beam search -------------------------------------------------


def hf_beam_search_by_hand(table, start: int, k: int, alpha: float, max_new: int, eos: int, banned: int):
    """transformers' beam search (its vectorised one, GenerationMixin._beam_search, with
    early_stopping=False) for one prompt, written out with lists: the K best of the top-2K
    candidates that end (EOS among the best K; at the limit, all of the best K) join the K best
    finished, scored log P / |Y|^α; done when K have finished and the best running beam at its
    length scores no better than the worst of them. Log-probabilities in float32, as it has them."""
    log_probs = table.float().log_softmax(-1)
    log_probs[:, banned] = float("-inf")  # its bad_words_ids: after the log-softmax
    running, finished = [(torch.tensor(0.0), [])], []
    for t in range(1, max_new + 1):
        candidates = sorted(((score + log_probs[seq[-1] if seq else start, v], seq + [v])
                             for score, seq in running for v in range(table.size(1))),
                            key=lambda c: float(c[0]), reverse=True)[: 2 * k]
        for score, seq in candidates[:k]:
            if seq[-1] == eos or t == max_new:
                finished.append((float(score / t**alpha), seq))
        finished = sorted(finished, key=lambda f: f[0], reverse=True)[:k]
        running = [c for c in candidates if c[1][-1] != eos][:k]
        if len(finished) == k and float(running[0][0] / t**alpha) <= finished[-1][0]:
            break
    return finished[0][1]


@pytest.mark.parametrize("alpha", [1.0, 0.0, 0.6, 2.0, -0.5])
def test_hf_style_beam_search_equals_transformers_algorithm_written_by_hand(alpha):
    """Many small random problems, beams of 1–3, limits of 1–6, one banned token."""
    eos, banned, vocab = 0, 7, 8
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        table = torch.randn(vocab, vocab, generator=generator) * 2
        table[:, eos] += 1.0  # hypotheses end at many lengths
        table[:, banned] += 2.0  # a likely banned token: its mass is removed, not renormalised away
        k, max_new = seed % 3 + 1, seed % 6 + 1
        prompt = torch.tensor([[1], [4]])
        got = beam_search(MarkovChain(table, 2), prompt, max_new, beam_size=k, alpha=alpha, eos_id=eos,
                          pad_id=banned, length_penalty_style="hf", banned=torch.tensor([banned]))
        for row, start in zip(got.tolist(), (1, 4)):
            expected = hf_beam_search_by_hand(table, start, k, alpha, max_new, eos, banned)
            assert row == expected + [banned] * (len(row) - len(expected)), (seed, k, max_new)


def test_stable_slots_keep_each_parents_best_new_beam_in_its_row():
    """Slot j of the result names the new beam (by rank) that goes into row j: each parent's
    best new beam stays in the parent's row, the others fill the remaining rows in rank order."""
    parents = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2], [3, 2, 1, 0], [1, 0, 0, 3]])
    assert stable_slots(parents).tolist() == [[0, 2, 1, 3], [1, 2, 0, 3], [3, 2, 1, 0], [1, 0, 2, 3]]
    generator = torch.Generator().manual_seed(0)
    parents = torch.randint(0, 5, (200, 5), generator=generator)
    slots = stable_slots(parents)
    assert torch.equal(slots.sort(dim=1).values, torch.arange(5).expand(200, 5))  # a permutation
    for row_parents, row_slots in zip(parents.tolist(), slots.tolist()):
        best_child = {p: row_parents.index(p) for p in set(row_parents)}
        assert all(row_slots[p] == child for p, child in best_child.items())
        others = [child for row, child in enumerate(row_slots) if row not in best_child]
        assert others == sorted(others)


def test_beam_search_moves_only_beams_whose_parent_left_their_row(monkeypatch):
    """Within a prompt, a row keeps its state unless the beam that used it has no continuation:
    at every step as many rows stay as the beams have distinct parents, so the KV cache copies
    only the others. Where the beams sit changes nothing they find: the results equal a search
    that puts them in rank order."""

    class Recording(MarkovChain):
        def reorder(self, rows, within_prompts=False):
            if within_prompts:
                within.append(rows.clone())
            super().reorder(rows, within_prompts)

    k, prompt = 3, torch.tensor([[2], [3], [1]])
    for seed in range(4):
        table = _table(vocab=7, seed=seed)
        within = []
        got = beam_search(Recording(table, 3), prompt, 6, beam_size=k, alpha=0.6, eos_id=0, pad_id=0)
        assert len(within) >= 3
        for rows in within:
            blocks = rows.view(-1, k) - torch.arange(0, rows.numel(), k)[:, None]  # parents within each prompt
            for parents in blocks.tolist():
                assert sum(parent == row for row, parent in enumerate(parents)) == len(set(parents))
        with monkeypatch.context() as patch:
            patch.setattr("fromscratch.blocks.search.stable_slots",
                          lambda parents: torch.arange(parents.size(1)).expand_as(parents))
            in_rank_order = beam_search(MarkovChain(table, 3), prompt, 6, beam_size=k, alpha=0.6, eos_id=0, pad_id=0)
        assert torch.equal(got, in_rank_order)


def test_beam_search_refuses_an_unknown_style():
    with pytest.raises(UserError, match="length_penalty_style 'marian'"):
        beam_search(MarkovChain(_table(), 1), torch.tensor([[1]]), 3, length_penalty_style="marian")


def test_beam_search_drops_prompts_that_are_done_and_finds_what_it_found_before():
    """A prompt whose best hypothesis can no longer be beaten leaves the batch (its rows are
    reordered away), and every prompt's result is what it is when searched alone."""
    table = _table(6, seed=3)
    table[:, 0] += 1.5  # EOS likely: prompts finish at different steps
    prompts = torch.tensor([[1], [2], [3], [4], [5]])
    chain = MarkovChain(table, 5)
    together = beam_search(chain, prompts, 12, beam_size=3, eos_id=0, pad_id=0)
    assert len(chain.rows) < 5 * 3  # some prompts left before the end
    for b in range(5):
        alone = beam_search(MarkovChain(table, 1), prompts[b:b + 1], 12, beam_size=3, eos_id=0, pad_id=0)
        assert together[b, :alone.size(1)].tolist() == alone[0].tolist()


def test_ban_repeated_ngrams_bans_exactly_the_tokens_that_would_complete_a_seen_ngram():
    """Row [5, 6, 7, 5, 6]: with n = 3, 7 would repeat (5, 6, 7); with n = 2, 7 (after 6) again;
    with n = 1 every token seen; a row shorter than n bans nothing. Checked against every n-gram
    written out by hand."""
    tokens = torch.tensor([[5, 6, 7, 5, 6], [1, 2, 3, 4, 1]])
    for n in (1, 2, 3, 4, 5, 6):
        scores = ban_repeated_ngrams(torch.zeros(2, 9), tokens, n)
        for row, seq in enumerate(tokens.tolist()):
            seen = {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}
            expected = {v for v in range(9) if tuple(seq[len(seq) - n + 1:] + [v]) in seen} if n <= len(seq) else set()
            assert {v for v in range(9) if scores[row, v] == float("-inf")} == expected, (n, row)
    assert ban_repeated_ngrams(torch.zeros(2, 9), tokens, 3)[0].isinf().nonzero().flatten().tolist() == [7]
    assert ban_repeated_ngrams(torch.zeros(2, 9), tokens, 2)[1].isinf().nonzero().flatten().tolist() == [2]
    assert not ban_repeated_ngrams(torch.zeros(2, 9), tokens, 0).isinf().any()


class PromptChain(MarkovChain):
    """A Markov chain whose logits also depend on the prompt each row belongs to, which the search
    must carry along: moved by reorder (within its prompt, when it says so), set by admit when a
    prompt joins a pool."""

    def __init__(self, table: torch.Tensor, prompt_bias: torch.Tensor, batch_size: int):
        super().__init__(table, batch_size)
        self.prompt_bias, self.prompt_of, self.admitted = prompt_bias, torch.arange(batch_size), []

    def __call__(self, tokens):
        return super().__call__(tokens) + self.prompt_bias[self.prompt_of]

    def reorder(self, rows, within_prompts=False):
        super().reorder(rows, within_prompts)
        if within_prompts:
            assert torch.equal(self.prompt_of[rows], self.prompt_of)
        self.prompt_of = self.prompt_of[rows]

    def admit(self, rows, prompts):
        self.admitted += prompts.tolist()
        self.prompt_of[rows] = prompts.repeat_interleave(len(rows) // len(prompts))


@pytest.mark.parametrize("style", ["gnmt", "hf"])
def test_a_pool_of_prompts_finds_for_each_what_it_finds_alone(style):
    """At most `pool` prompts searched at once, each later one taking the rows of one that is
    done, each with its own limit: every prompt's result is the one it gets alone."""
    vocab, n, k, pad = 7, 9, 3, 9
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        table = _table(vocab, seed)
        table[:, 0] += 1.0  # EOS likely: prompts finish at different steps
        bias = torch.randn(n, vocab, generator=generator)
        prompts = torch.randint(1, vocab, (n, 2), generator=generator)
        limits = torch.randint(1, 9, (n,), generator=generator)
        alone = [beam_search(PromptChain(table, bias[b:b + 1], 1), prompts[b:b + 1], int(limits[b]), beam_size=k,
                             eos_id=0, pad_id=pad, length_penalty_style=style)[0].tolist() for b in range(n)]
        for pool in (1, 2, 4, None):
            chain = PromptChain(table, bias, min(pool or n, n))
            got = beam_search(chain, prompts, limits, beam_size=k, eos_id=0, pad_id=pad, length_penalty_style=style,
                              pool=pool)
            assert chain.admitted == list(range(pool or n, n))
            assert got.size(1) == max(map(len, alone))
            for row, expected in zip(got.tolist(), alone):
                assert row == expected + [pad] * (len(row) - len(expected)), (seed, pool)
