"""The shared KV cache (growing, preallocated, static) and the shared searches (sampling, beam
search), checked on their own, away from any model: a toy next-token function whose best
sequence can be found by enumeration."""

import itertools
import math

import pytest
import torch

from fromscratch.blocks import KVCache, beam_search, gnmt_length_penalty, sample, scaled_dot_product_attention
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


def test_preallocated_reorders_gather_into_a_second_buffer_and_swap():
    """Each reorder writes the filled positions into the other of two buffers (no new memory),
    drops rows by using the first rows of the spare, and keeps every row's keys exact."""
    steps = _steps(n_steps=4, batch=4)
    cache = KVCache(n_layers=1, max_len=6)
    expected = torch.cat([k for k, _ in steps], dim=2)  # (4, 2, 4, 4)
    for k, v in steps:
        cache.update(0, k, v)
        cache.advance(1)
    first = cache.keys[0].data_ptr()
    for rows in ([3, 3, 1, 0], [1, 0, 2, 2], [2, 0, 1, 3]):
        rows = torch.tensor(rows)
        cache.reorder(rows)
        expected = expected[rows]
        torch.testing.assert_close(cache.keys[0][:, :, :4], expected, rtol=0, atol=0)
    # Three swaps: the second buffer holds the keys, the first is the spare.
    assert cache.keys[0].data_ptr() != first and cache.spare_keys[0].data_ptr() == first
    cache.reorder(torch.tensor([2, 0]))  # two rows leave: the spare's first two rows take the rest
    torch.testing.assert_close(cache.keys[0][:, :, :4], expected[[2, 0]], rtol=0, atol=0)
    assert cache.keys[0].shape == (2, 2, 6, 4) and cache.keys[0].data_ptr() == first
    keys, _ = cache.update(0, torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4))
    torch.testing.assert_close(keys, torch.cat([expected[[2, 0]], torch.ones(2, 2, 1, 4)], dim=2), rtol=0, atol=0)


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
