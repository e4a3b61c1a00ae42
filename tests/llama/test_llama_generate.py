"""Generation: cached = uncached, batched = unbatched, sampling is reproducible and filters
correctly, beam search, lengths are checked. (Greedy parity with Hugging Face is in
test_llama_model.py.)"""

import pytest
import torch
from helpers import repeats_an_ngram

from fromscratch.blocks import sample_next_token, top_k_filter, top_p_filter
from fromscratch.errors import UserError
from fromscratch.llama.config import LlamaConfig
from fromscratch.llama.fast import PackedDecoder, accelerate
from fromscratch.llama.generation import generate
from fromscratch.llama.model import Llama


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", max_seq_len=64)).eval()
    with torch.no_grad():  # sharper distributions than the 0.02 init, so tokens vary
        for p in model.parameters():
            p.mul_(5.0)
    return accelerate(model)


@pytest.fixture(params=["packed", "forward"])
def decoding(request, model, monkeypatch):
    """Run a test through both ways of decoding after the prompt: the packed one-token step
    (fast.py, what `accelerate` installs for small models on a CPU) and Llama.forward with the
    cache (the plain model)."""
    monkeypatch.setattr(model, "decode_step", PackedDecoder(model) if request.param == "packed" else None)
    return request.param


def _prompts(vocab_size: int, lengths=(3, 11, 7)) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_k=20, seed=3)])
def test_cached_and_uncached_generation_agree(model, sampling, decoding):
    prompt = torch.tensor(_prompts(model.config.vocab_size, lengths=(6, 6)))
    cached = generate(model, prompt, 30, use_cache=True, **sampling)
    uncached = generate(model, prompt, 30, use_cache=False, **sampling)
    assert cached.shape == (2, 36)
    assert torch.equal(cached[:, :6], prompt)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("use_cache", [True, False])
def test_ragged_batch_equals_each_row_alone(model, use_cache, decoding):
    prompts = _prompts(model.config.vocab_size)
    batched = model.generate(prompts, 25, temperature=0, use_cache=use_cache)
    alone = [model.generate(row, 25, temperature=0, use_cache=use_cache) for row in prompts]
    assert all(isinstance(row, list) for row in batched)
    assert [len(row) for row in batched] == [len(p) + 25 for p in prompts]
    assert batched == alone
    assert len({tuple(row[len(p):]) for row, p in zip(batched, prompts)}) == 3  # rows differ


def test_eos_stops_each_row(model, decoding):
    prompts = _prompts(model.config.vocab_size)
    free = model.generate(prompts, 20, temperature=0)
    eos_id = free[1][len(prompts[1]) + 4]  # row 1 produces it as its 5th new token
    stopped = model.generate(prompts, 20, temperature=0, eos_id=eos_id)
    for row, full, prompt in zip(stopped, free, prompts):
        new = full[len(prompt):]
        expected = full[: len(prompt) + new.index(eos_id) + 1] if eos_id in new else full
        assert row == expected
    assert stopped[1][-1] == eos_id and len(stopped[1]) <= len(prompts[1]) + 5
    # As a tensor: finished rows are filled with eos_id, and decoding stops once all have it.
    tensor = generate(model, torch.tensor([prompts[1]]), 20, temperature=0, eos_id=eos_id)
    assert tensor[0].tolist() == stopped[1]


def test_stream_receives_every_new_token(model):
    prompts = _prompts(model.config.vocab_size)
    seen = []
    out = model.generate(prompts, 8, temperature=0, stream=seen.append)
    assert len(seen) == 8
    assert [[step[b] for step in seen] for b in range(3)] == [row[len(p):] for row, p in zip(out, prompts)]


def test_sampling_is_reproducible(model):
    prompt = torch.tensor(_prompts(model.config.vocab_size, lengths=(5,)))
    a = generate(model, prompt, 30, temperature=1.0, seed=7)
    b = generate(model, prompt, 30, temperature=1.0, generator=torch.Generator().manual_seed(7))
    c = generate(model, prompt, 30, temperature=1.0, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, generate(model, prompt, 30, temperature=0))


def test_top_k_1_is_greedy(model):
    prompt = torch.tensor(_prompts(model.config.vocab_size, lengths=(5,)))
    greedy = generate(model, prompt, 30, temperature=0)
    assert torch.equal(generate(model, prompt, 30, temperature=1.5, top_k=1, seed=0), greedy)


def test_top_k_filter_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = top_k_filter(logits, 3)
    assert torch.isfinite(kept).tolist() == [[False, True, True, True, False]]
    assert torch.equal(kept[torch.isfinite(kept)], logits[0, 1:4])


def test_top_p_filter_keeps_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    logits = probs.log()
    # Ranked 0.5, 0.3, 0.15, 0.05: the first two reach 0.8 ≥ 0.7, so the rest go.
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[False, True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.9)).tolist() == [[False, True, True, True]]
    assert torch.isfinite(top_p_filter(logits, 0.2)).tolist() == [[False, True, False, False]]
    # Sampling draws only from the nucleus, renormalised: 0.5 / 0.8 and 0.3 / 0.8.
    generator = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits.expand(20000, 4), temperature=1.0, top_p=0.7, generator=generator)
    counts = torch.bincount(draws, minlength=4) / 20000
    assert counts[0] == 0 and counts[3] == 0
    assert abs(counts[1] - 0.625) < 0.02 and abs(counts[2] - 0.375) < 0.02


def test_lengths_are_checked(model):
    max_seq_len = model.config.max_seq_len  # 64
    with pytest.raises(UserError, match="65 tokens.*max_seq_len is 64"):
        generate(model, [1] * 65, 1)
    with pytest.raises(UserError, match=r"60 tokens\) \+ max_new_tokens \(10\) = 70 .* at most 4"):
        generate(model, torch.ones(1, 60, dtype=torch.long), 10)
    assert len(generate(model, [1] * 60, 4, temperature=0)) == max_seq_len  # exactly fits
    with pytest.raises(UserError, match="at least one token"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(UserError, match="top_p"):
        generate(model, [1, 2], 3, top_p=0.0)
    with pytest.raises(UserError, match="temperature"):
        generate(model, [1, 2], 3, temperature=-1)


def test_nan_logits_and_a_nan_temperature_are_refused(model):
    with pytest.raises(UserError, match="temperature"):
        generate(model, [1, 2], 3, temperature=float("nan"))
    broken = Llama(LlamaConfig.from_preset("tiny", max_seq_len=64)).eval()
    with torch.no_grad():
        broken.norm.weight.fill_(float("nan"))
    with pytest.raises(UserError, match="NaN logits"):
        generate(broken, [1, 2], 3, temperature=0.8)


def test_beam_search_of_one_is_greedy_and_wider_beams_score_at_least_as_well(model, decoding):
    prompts = _prompts(model.config.vocab_size)
    greedy = model.generate(prompts, 12, temperature=0)
    assert model.generate(prompts, 12, beam_size=1, temperature=0) == greedy
    # Beam 1 with α = 0 keeps the single best extension at every step: greedy.
    assert model.generate(prompts, 12, beam_size=1, length_penalty=0.0, temperature=0) == greedy

    def log_prob(row, prompt_len):
        with torch.no_grad():
            logits = model(torch.tensor([row[:-1]])).log_softmax(-1)[0]
        return sum(logits[t - 1, row[t]].item() for t in range(prompt_len, len(row)))

    beams = model.generate(prompts, 12, beam_size=4, length_penalty=0.0)
    for beam, best, prompt in zip(beams, greedy, prompts):
        assert len(beam) == len(prompt) + 12 and beam[:len(prompt)] == prompt
        assert log_prob(beam, len(prompt)) >= log_prob(best, len(prompt)) - 1e-4
    # A ragged batch decodes each prompt as it would alone.
    assert beams == [model.generate(p, 12, beam_size=4, length_penalty=0.0) for p in prompts]


def test_beam_search_without_repeated_ngrams_never_repeats_one(model):
    prompt = [1, 5, 6, 7, 5, 6]  # the prompt repeats itself; only the new tokens are held to the ban
    plain = model.generate(prompt, 30, beam_size=4, length_penalty=0.0)
    banned = model.generate(prompt, 30, beam_size=4, length_penalty=0.0, no_repeat_ngram_size=1)
    assert repeats_an_ngram(plain, 1, start=len(prompt))  # without the ban, a token comes back
    assert not repeats_an_ngram(banned, 1, start=len(prompt))  # with it, no token of the row does
    with pytest.raises(UserError, match="no_repeat_ngram_size must be 0"):
        model.generate(prompt, 3, no_repeat_ngram_size=-1)
