"""Greedy and beam search (§6.1): the cache changes speed, never tokens; beam search is at
least as good as greedy under its own score; padding and output format."""

import pytest
import torch

from fromscratch.transformer import decoding
from fromscratch.transformer.decoding import beam_search, greedy_decode, length_penalty, sequence_scores
from fromscratch.transformer.model import Transformer, TransformerConfig

VOCAB = 20


def random_model(seed=0, **overrides) -> Transformer:
    """An untrained tiny model. Untied embeddings: a random tied model mostly repeats its input
    token (h · E_prev dominates the logits), which makes every decoding test trivially pass."""
    torch.manual_seed(seed)
    config = TransformerConfig.from_preset(
        "tiny", **{"vocab_size": VOCAB, "dropout": 0.0, "share_embeddings": False, **overrides}
    )
    return Transformer(config).eval()


def sources(lengths=(7, 3, 5), seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), max(lengths)), generator=generator)
    for row, n in enumerate(lengths):
        ids[row, n:] = 0
    return ids


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_cached_and_uncached_generation_agree(beam_size, norm_first):
    model = random_model(norm_first=norm_first)
    src = sources()
    cached = model.generate(src, max_new_tokens=15, beam_size=beam_size, use_cache=True)
    uncached = model.generate(src, max_new_tokens=15, beam_size=beam_size, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len(set(map(tuple, cached.tolist()))) == 3  # the sources really differ


@pytest.mark.parametrize("use_cache", [True, False])
def test_beams_share_their_source_and_translate_as_with_a_copy_each(use_cache, monkeypatch):
    """Beam search keeps one encoder output (and one projection of its keys and values) per
    source for all its beams, also after finished sources leave; the translations equal those
    of a search that gives every beam its own copy."""
    model, src = random_model(), sources(lengths=(7, 3, 5, 6, 2))
    seen = []
    call = decoding.TranslationNextToken.__call__

    def recording(self, prefix):
        seen.append((prefix.size(0), self.memory.size(0)))
        return call(self, prefix)

    monkeypatch.setattr(decoding.TranslationNextToken, "__call__", recording)
    shared = beam_search(model, src, max_new_tokens=15, beam_size=3, use_cache=use_cache)
    assert seen[0] == (5, 5) and all(rows == 3 * sources for rows, sources in seen[1:])
    assert len({sources for _, sources in seen}) > 2  # finished sources left along the way
    monkeypatch.setattr(decoding, "shared_rows", lambda rows, group: (rows // group, 1))  # a copy per beam
    seen.clear()
    copies = beam_search(model, src, max_new_tokens=15, beam_size=3, use_cache=use_cache)
    assert seen[1][0] == seen[1][1] == 15
    assert torch.equal(shared, copies)


def test_cache_gives_the_same_log_probs_step_by_step():
    model = random_model()
    src = sources()
    memory, src_mask = model.encode(src)
    prefix = torch.randint(3, VOCAB, (3, 6))
    full = model.output_projection(model.decode(prefix, memory, src_mask))
    cache = model.new_cache()
    with torch.no_grad():
        steps = [model.output_projection(model.decode(prefix[:, t : t + 1], memory, src_mask, cache))
                 for t in range(6)]
        # several positions at once after a cached prefix works too
        cache2 = model.new_cache()
        model.decode(prefix[:, :2], memory, src_mask, cache2)
        rest = model.output_projection(model.decode(prefix[:, 2:], memory, src_mask, cache2))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rest, full[:, 2:], atol=1e-5, rtol=1e-5)
    assert cache.length == 6
    assert cache.self_attention.keys[0].shape == (3, 4, 6, 16)  # (B, n_heads, T, head_dim)
    assert cache.cross_attention.keys[0].shape == (3, 4, 7, 16)  # the source's, computed once


def test_beam_of_one_without_length_penalty_is_greedy():
    model = random_model()
    src = sources()
    greedy = greedy_decode(model, src, max_new_tokens=15)
    assert torch.equal(beam_search(model, src, max_new_tokens=15, beam_size=1, alpha=0.0), greedy)
    assert torch.equal(model.generate(src, max_new_tokens=15, beam_size=1), greedy)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_beam_search_scores_at_least_as_well_as_greedy(alpha):
    src = sources(lengths=(6, 4, 5, 3, 6, 2), seed=2)
    for seed in range(3):
        model = random_model(seed)
        greedy = model.generate(src, max_new_tokens=12)
        beam = model.generate(src, max_new_tokens=12, beam_size=4, length_penalty=alpha)
        greedy_score = sequence_scores(model, src, greedy, alpha)
        beam_score = sequence_scores(model, src, beam, alpha)
        assert (beam_score >= greedy_score - 1e-5).all()
        assert (beam_score > greedy_score + 1e-3).any() or seed > 0  # it really searches


def test_beam_search_finds_the_exact_best_on_a_tiny_space():
    """Vocabulary {EOS, a, b} plus the specials, at most 3 tokens: few enough hypotheses to
    score them all. A wide beam must find the best one."""
    import itertools

    model = random_model(seed=3, vocab_size=5)
    src = torch.tensor([[3, 4, 3, 4]])
    candidates = [list(c) + [2] for n in range(3) for c in itertools.product([3, 4], repeat=n)]
    candidates += [list(c) for c in itertools.product([2, 3, 4], repeat=3) if 2 not in c]
    width = 3
    padded = torch.tensor([c + [0] * (width - len(c)) for c in candidates])
    scores = sequence_scores(model, src.expand(len(candidates), -1), padded, alpha=0.6)
    best = padded[scores.argmax()]
    found = model.generate(src, max_new_tokens=3, beam_size=6, length_penalty=0.6)[0]
    assert found.tolist() == best[: len(found)].tolist()


def test_output_format():
    model = random_model()
    src = sources()
    for out in (model.generate(src, max_new_tokens=15), model.generate(src, max_new_tokens=15, beam_size=3)):
        assert out.dtype == torch.long and out.size(0) == 3 and out.size(1) <= 15
        for row in out.tolist():
            assert model.config.bos_id not in row
            if model.config.eos_id in row:  # padding, and only padding, after the EOS
                end = row.index(model.config.eos_id)
                assert all(t == model.config.pad_id for t in row[end + 1 :])
            else:
                assert model.config.pad_id not in row
        assert (out[:, -1] != model.config.pad_id).any()  # as wide as the longest, no wider
    assert (out == model.config.eos_id).any()  # (this model does end some hypotheses)


def test_default_length_is_source_length_plus_50():
    model = random_model(eos_id=1)  # EOS = BOS, which is never generated: nothing stops early
    src = sources(lengths=(7, 3))
    out = model.generate(src)
    assert out.size(1) == 7 + 50
    assert torch.equal(out, greedy_decode(model, src, max_new_tokens=57))


def test_stop_at_eos_false_runs_every_step():
    model = random_model()
    out = greedy_decode(model, sources(), max_new_tokens=9, stop_at_eos=False)
    assert out.shape == (3, 9)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_padding_the_source_changes_nothing(beam_size):
    model = random_model()
    src = sources(lengths=(7, 3, 5))
    padded = torch.cat([src, torch.zeros(3, 6, dtype=torch.long)], dim=1)
    out = model.generate(src, beam_size=beam_size, max_new_tokens=12)
    assert torch.equal(model.generate(padded, beam_size=beam_size, max_new_tokens=12), out)
    # each source decoded alone, unpadded, matches its row of the batch
    for row, n in enumerate((7, 3, 5)):
        alone = model.generate(src[row : row + 1, :n], beam_size=beam_size, max_new_tokens=12)[0]
        assert alone.tolist() == out[row, : len(alone)].tolist()
        assert (out[row, len(alone) :] == model.config.pad_id).all()


def test_generate_restores_training_mode():
    model = random_model(dropout=0.5).train()
    src = sources()
    first = model.generate(src, max_new_tokens=8)
    assert model.training
    assert torch.equal(model.generate(src, max_new_tokens=8), first)  # dropout was off


def test_length_penalty_is_gnmt():
    assert length_penalty(1, 0.6) == pytest.approx(1.0)
    assert length_penalty(7, 0.6) == pytest.approx(2.0**0.6)
    assert length_penalty(13, 0.0) == 1.0
