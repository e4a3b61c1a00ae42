"""Llama 2 model: parity with Hugging Face `LlamaForCausalLM`, properties of RMSNorm and RoPE,
the KV cache, and a learning test on real text."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import hf_llama_weights_to_ours, repeats_an_ngram

from fromscratch.errors import UserError
from fromscratch.llama.config import LlamaConfig
from fromscratch.llama.fast import accelerate
from fromscratch.llama.model import Llama, RMSNorm, apply_rope, precompute_rope_rotations

transformers = pytest.importorskip("transformers")


# --- Hugging Face reference ------------------------------------------------------------------

def hf_config(config: LlamaConfig):
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model,
        intermediate_size=config.hidden_dim, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False,
    )


def hf_and_ours(config: LlamaConfig):
    """A randomly initialised HF model and ours holding the same weights."""
    hf = transformers.LlamaForCausalLM(hf_config(config)).eval()
    with torch.no_grad():
        for p in hf.parameters():  # non-trivial norms too (HF initialises them to 1)
            p.normal_(0.0, 0.1)
    ours = Llama(config).eval()
    ours.load_state_dict(hf_llama_weights_to_ours(hf.state_dict(), config.n_heads, config.kv_heads), strict=True)
    return hf, ours


PARITY_CONFIGS = {
    "mha": LlamaConfig.from_preset("tiny", n_kv_heads=None, vocab_size=300),
    "gqa": LlamaConfig.from_preset("tiny", n_heads=8, n_kv_heads=2, n_layers=3, vocab_size=300),
    "mqa": LlamaConfig.from_preset("tiny", n_kv_heads=1, vocab_size=300),
    "tied": LlamaConfig.from_preset("stories260k", n_layers=2),
}


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_logits_match_huggingface(name):
    config = PARITY_CONFIGS[name]
    hf, ours = hf_and_ours(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 37))
    with torch.no_grad():
        expected = hf(input_ids).logits
        got = ours(input_ids)
    assert got.shape == (2, 37, config.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_greedy_generation_matches_huggingface(name):
    config = PARITY_CONFIGS[name]
    hf, ours = hf_and_ours(config)
    prompt = torch.randint(0, config.vocab_size, (1, 5))
    expected = hf.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    got = ours.generate(prompt, 40, temperature=0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_greedy_generation_without_repeated_ngrams_matches_huggingface(n):
    config = PARITY_CONFIGS["tied"]
    hf, ours = hf_and_ours(config)
    prompt = torch.randint(0, config.vocab_size, (2, 6))
    prompt[:, 3:] = prompt[:, :3]  # the prompt repeats a trigram: its n-grams are banned too
    plain = ours.generate(prompt, 40, temperature=0)
    expected = hf.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0,
                           no_repeat_ngram_size=n)
    got = ours.generate(prompt, 40, temperature=0, no_repeat_ngram_size=n)
    assert torch.equal(got, expected)
    assert not torch.equal(got, plain)  # the ban changed something, so the comparison means something
    assert not any(repeats_an_ngram(row, n, start=prompt.size(1)) for row in got.tolist())


def test_parameter_names_are_metas():
    model = Llama(LlamaConfig.from_preset("tiny", n_layers=1))
    assert set(model.state_dict()) == {
        "tok_embeddings.weight", "norm.weight", "output.weight",
        "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight",
        "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
        "layers.0.attention.wv.weight", "layers.0.attention.wo.weight",
        "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight",
        "layers.0.feed_forward.w3.weight",
    }
    tied = Llama(LlamaConfig.from_preset("stories260k"))
    assert tied.output.weight is tied.tok_embeddings.weight


# --- config ------------------------------------------------------------------------------------

def test_presets_have_the_published_shapes():
    # Meta's params.json / HF configs: intermediate sizes 11008, 13824, 28672.
    assert LlamaConfig.from_preset("7b").hidden_dim == 11008
    assert LlamaConfig.from_preset("13b").hidden_dim == 13824
    assert LlamaConfig.from_preset("70b").hidden_dim == 28672 and LlamaConfig.from_preset("70b").kv_heads == 8
    # llama2.c's TinyStories models.
    stories = ("stories260k", "stories15m", "stories42m", "stories110m")
    assert [LlamaConfig.from_preset(n).hidden_dim for n in stories] == [172, 768, 1376, 2048]
    assert LlamaConfig.from_preset("stories260k").kv_heads == 4
    # Parameter counts the names promise (7B counts its untied classifier).
    assert 15.1e6 < _count(LlamaConfig.from_preset("stories15m")) < 15.3e6
    assert 6.6e9 < _count(LlamaConfig.from_preset("7b")) < 6.8e9
    assert 12.9e9 < _count(LlamaConfig.from_preset("13b")) < 13.1e9
    assert 68.9e9 < _count(LlamaConfig.from_preset("70b")) < 69.1e9


def _count(config: LlamaConfig) -> int:
    """Parameter count from the shapes, without allocating the model."""
    d, h, kv = config.d_model, config.hidden_dim, config.kv_heads * config.head_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * h + 2 * d
    classifier = 0 if config.tie_embeddings else config.vocab_size * d
    return config.vocab_size * d + config.n_layers * per_layer + d + classifier


def test_count_helper_agrees_with_a_real_model():
    for name in ("tiny", "stories260k"):
        assert Llama(LlamaConfig.from_preset(name)).num_parameters() == _count(LlamaConfig.from_preset(name))


def test_config_presets_overrides_and_json_round_trip():
    config = LlamaConfig.from_preset("tiny", vocab_size=1000, n_layers=3)
    assert (config.vocab_size, config.n_layers, config.d_model) == (1000, 3, 64)
    assert LlamaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(UserError, match="tiny"):
        LlamaConfig.from_preset("llama-9000")
    with pytest.raises(UserError, match="n_layer"):
        LlamaConfig.from_preset("tiny", n_layer=3)
    with pytest.raises(UserError, match="bogus"):
        LlamaConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(UserError, match="n_kv_heads"):
        LlamaConfig.from_preset("tiny", n_kv_heads=3)


# --- RMSNorm and RoPE ------------------------------------------------------------------------------

def test_rmsnorm_matches_formula_and_huggingface():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(3, 5, 16) * 4
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    hf = LlamaRMSNorm(16, eps=1e-5)
    hf.weight.data.copy_(norm.weight.data)
    torch.testing.assert_close(norm(x), hf(x))
    # Computed in float32 even for bfloat16 input.
    torch.testing.assert_close(norm(x.bfloat16()).float(), expected, atol=0.1, rtol=0.02)


def test_rope_score_depends_only_on_relative_position():
    head_dim = 32
    rotations = precompute_rope_rotations(head_dim, 200)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(m: int, n: int) -> torch.Tensor:
        seq = torch.zeros(1, 200, 1, head_dim)
        seq[0, m, 0], seq[0, n, 0] = q, k  # m == n is never asked
        rotated = apply_rope(seq, rotations)
        return rotated[0, m, 0] @ rotated[0, n, 0]

    for m, n in [(5, 2), (17, 30), (0, 9)]:
        for shift in (1, 50, 150):
            torch.testing.assert_close(score(m + shift, n + shift), score(m, n), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_rope_rotates_adjacent_pairs_by_position_times_frequency():
    head_dim, theta = 8, 10000.0
    x = torch.randn(1, 4, 1, head_dim)
    got = apply_rope(x, precompute_rope_rotations(head_dim, 4, theta))
    for m in range(4):
        for j in range(head_dim // 2):
            angle = m * theta ** (-2 * j / head_dim)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[0, m, 0, 2 * j], x[0, m, 0, 2 * j + 1]
            torch.testing.assert_close(got[0, m, 0, 2 * j], a * c - b * s)
            torch.testing.assert_close(got[0, m, 0, 2 * j + 1], a * s + b * c)
    # Norms are preserved: a rotation.
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))


# --- attention paths and the KV cache ----------------------------------------------------------

def test_sdpa_and_explicit_attention_agree():
    config = LlamaConfig.from_preset("tiny")
    fused = Llama(config).eval()
    explicit = Llama(LlamaConfig.from_preset("tiny", use_sdpa=False)).eval()
    explicit.load_state_dict(fused.state_dict())
    input_ids = torch.randint(0, config.vocab_size, (2, 50))
    pad_lengths = torch.tensor([0, 7])
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids), explicit(input_ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused(input_ids, pad_lengths=pad_lengths),
                                   explicit(input_ids, pad_lengths=pad_lengths), atol=1e-5, rtol=1e-5)


def test_causal_mask_keeps_every_position_from_seeing_later_tokens():
    """Changing token t changes no logit before position t: what next_token_loss trains on at
    position t (predict token t+1) never saw that token."""
    config = LlamaConfig.from_preset("tiny")
    model = Llama(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 20))
    changed = ids.clone()
    changed[:, 12] = (changed[:, 12] + 1) % config.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=0, rtol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_cached_forward_equals_full_forward():
    config = LlamaConfig.from_preset("tiny")
    model = Llama(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(input_ids)
        cache = model.new_cache(2, 30)
        chunks = [model(input_ids[:, :10], cache=cache), model(input_ids[:, 10:20], cache=cache)]
        chunks += [model(input_ids[:, t:t + 1], cache=cache) for t in range(20, 30)]
    assert cache.length == 30
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_row_computes_what_it_computes_alone():
    config = LlamaConfig.from_preset("tiny")
    model = Llama(config).eval()
    short = torch.randint(0, config.vocab_size, (1, 12))
    long = torch.randint(0, config.vocab_size, (1, 20))
    batch = torch.cat([torch.cat([torch.zeros(1, 8, dtype=torch.long), short], dim=1), long])
    with torch.no_grad():
        batched = model(batch, pad_lengths=torch.tensor([8, 0]))
        torch.testing.assert_close(batched[0, 8:], model(short)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[1], model(long)[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_is_sized_by_kv_heads():
    mha = LlamaConfig.from_preset("tiny", n_heads=8, n_kv_heads=None)
    gqa = LlamaConfig.from_preset("tiny", n_heads=8, n_kv_heads=2)
    mqa = LlamaConfig.from_preset("tiny", n_heads=8, n_kv_heads=1)
    sizes = {c.kv_heads: Llama(c).new_cache(batch_size=3, max_len=100).nbytes for c in (mha, gqa, mqa)}
    # 2 (keys and values) × layers × batch × kv_heads × positions × head_dim × 4 bytes
    assert sizes[8] == 2 * 2 * 3 * 8 * 100 * 8 * 4
    assert sizes[8] == 4 * sizes[2] == 8 * sizes[1]  # n_heads / n_kv_heads times smaller
    model = Llama(gqa)
    assert model.new_cache(3, 100).keys[0].shape == (3, 2, 100, 8)


def test_too_long_input_is_a_user_error():
    model = Llama(LlamaConfig.from_preset("tiny", max_seq_len=16))
    with pytest.raises(UserError, match="16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.new_cache(1, max_len=4)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(UserError, match="KV cache of 4"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


# --- training loss and weight layout ------------------------------------------------------------

@pytest.mark.parametrize("accelerated", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_loss_equals_cross_entropy_of_the_logits(tied, accelerated):
    """forward(targets=...) is the next-token cross-entropy of the logits, plain and through the
    fast path's loss that never holds all logits."""
    config = LlamaConfig.from_preset("tiny", tie_embeddings=tied)
    reference, ours = Llama(config), Llama(config)
    ours.load_state_dict(reference.state_dict())
    if accelerated:
        accelerate(ours)
    input_ids = torch.randint(0, config.vocab_size, (3, 40))
    targets = torch.randint(0, config.vocab_size, (3, 40))
    targets[0, :5] = -100  # ignored positions (padding)
    expected = F.cross_entropy(reference(input_ids).flatten(0, 1), targets.flatten())
    expected.backward()
    got = ours(input_ids, targets=targets)
    got.backward()
    torch.testing.assert_close(got, expected)
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


# --- learning ------------------------------------------------------------------------------------

def test_tiny_llama_learns_real_text(shared_data):
    """Bytes of TinyShakespeare, a 2-layer model, 120 AdamW steps: the loss must fall well below
    the ln(256) ≈ 5.5 of a uniform guess and below where it started."""
    text = (shared_data / "text" / "tinyshakespeare.txt").read_bytes()[:100_000]
    data = torch.tensor(list(text), dtype=torch.long)
    config = LlamaConfig.from_preset("tiny", vocab_size=256, max_seq_len=64)
    model = Llama(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(120):
        starts = torch.randint(0, len(data) - 65, (16,), generator=generator)
        batch = torch.stack([data[s:s + 65] for s in starts])
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 2.9 < first, (first, last)


# --- figures -------------------------------------------------------------------------------------

def test_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from fromscratch.llama.figures import kv_cache_bytes, plot_kv_cache_memory, plot_rope_rotation

    for plot in (plot_rope_rotation, plot_kv_cache_memory):
        path = plot(tmp_path / f"{plot.__name__}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = LlamaConfig.from_preset("tiny")
    cache_bytes = kv_cache_bytes(config, seq_len=100, batch_size=3, bytes_per_value=4)
    assert cache_bytes == Llama(config).new_cache(3, 100).nbytes
    # 7B in fp16 at 4k context: 2 · 32 layers · 32 heads · 128 · 4096 · 2 bytes = 2 GiB.
    assert kv_cache_bytes(LlamaConfig.from_preset("7b"), seq_len=4096) == 2 * 1024**3


def test_forward_with_targets_returns_the_summed_cross_entropy():
    model = Llama(LlamaConfig.from_preset("tiny"))
    ids = torch.randint(0, 512, (2, 12))
    targets = torch.randint(0, 512, (2, 12))
    expected = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(model(ids, targets=targets, reduction="sum"), expected, rtol=1e-5, atol=1e-4)
