"""Decoding the MoE Llama: the packed one-token step (moe/fast.py) equals `MoELlama.forward`;
generation through Llama's API (temperature, top-k, top-p, seeds, batched ragged prompts,
streaming) is cached = uncached and ragged = each prompt alone; greedy tokens equal
`MixtralForCausalLM.generate`'s."""

import pytest
import torch
from mixtral_reference import PARITY_CONFIGS, hf_and_ours

from fromscratch.llama.fast import PackedDecoder, PackedLlama
from fromscratch.moe import MoEConfig, MoELlama, accelerate, generate
from fromscratch.moe.fast import PackedMoEFeedForward

STEP_CONFIGS = {
    "top2": MoEConfig.from_preset("tiny"),
    "top1-8-experts": MoEConfig.from_preset("tiny", n_experts=8, top_k=1),
    "shared-experts-every-second": MoEConfig.from_preset("tiny", n_layers=4, moe_every=2, n_shared_experts=1),
    "capacity": MoEConfig.from_preset("tiny", capacity_factor=0.5),
    "sigmoid-bias-no-renormalisation": MoEConfig.from_preset("tiny", router_scoring="sigmoid", balance="bias",
                                                             norm_topk=False),
    "tied-mqa": MoEConfig.from_preset("tiny", n_kv_heads=1, tie_embeddings=True),
}


def random_model(config: MoEConfig) -> MoELlama:
    torch.manual_seed(0)
    model = MoELlama(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # larger than the init, so routing varies
            p.normal_(0.0, 0.5 if "router" in name else 0.2)
        for layer in model.moe_layers():
            if layer.router.expert_bias is not None:
                layer.router.expert_bias.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("batch", [3, 1])  # 1: the single-row path (`PackedMoEFeedForward.one_row`)
@pytest.mark.parametrize("name", STEP_CONFIGS)
def test_packed_step_logits_equal_the_full_forward(name, batch):
    model = random_model(STEP_CONFIGS[name])
    input_ids = torch.randint(0, model.config.vocab_size, (batch, 20))
    packed = PackedLlama(model)
    assert {type(layer.feed_forward) for layer in packed.layers} >= {PackedMoEFeedForward}
    with torch.no_grad():
        cache = model.new_cache(batch, 20)
        model.hidden_states(input_ids[:, :6], cache=cache)  # the prompt, through forward
        steps = torch.stack([packed.step(input_ids[:, t], cache) for t in range(6, 20)], dim=1)
        # forward one position at a time with the cache: the same token batches the step routes
        # (with a capacity, which tokens compete for an expert depends on the batch)
        cache = model.new_cache(batch, 20)
        model.hidden_states(input_ids[:, :6], cache=cache)
        expected = torch.cat([model(input_ids[:, t:t + 1], cache=cache) for t in range(6, 20)], dim=1)
    torch.testing.assert_close(steps, expected, atol=1e-4, rtol=1e-5)
    if name != "capacity":  # dropless: each token alone, so one full forward agrees too
        with torch.no_grad():
            torch.testing.assert_close(steps, model(input_ids)[:, 6:], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", STEP_CONFIGS)
def test_the_steps_router_chooses_and_weighs_as_the_layers(name):
    """`PackedMoEFeedForward.route` (Mixtral's router in three operations where it applies)."""
    layer = random_model(STEP_CONFIGS[name]).moe_layers()[0]
    x = torch.randn(64, layer.router.weight.size(1))
    with torch.no_grad():
        chosen, gates = PackedMoEFeedForward(layer).route(x)
        _, _, expected_chosen, expected_gates = layer.router(x)
    assert torch.equal(chosen, expected_chosen)
    torch.testing.assert_close(gates, expected_gates, atol=1e-6, rtol=1e-6)


def test_capacity_in_the_step_drops_slots_as_forward_does():
    model = random_model(STEP_CONFIGS["capacity"])
    layer = model.moe_layers()[0]
    x = torch.randn(6, model.config.d_model)
    with torch.no_grad():
        expected = layer(x)
        assert layer.stats["dropped_tokens"] > 0  # six tokens, room for ⌈0.5·2·6/4⌉ = 2 each
        torch.testing.assert_close(PackedMoEFeedForward(layer)(x), expected, atol=1e-5, rtol=1e-5)


def test_accelerate_packs_an_moe_llama():
    model = accelerate(random_model(STEP_CONFIGS["top2"]))
    assert isinstance(model.decode_step, PackedDecoder)
    generate(model, [1, 2, 3], 3, temperature=0)
    assert isinstance(model.decode_step.packed.layers[0].feed_forward, PackedMoEFeedForward)


@pytest.fixture(scope="module")
def model():
    return accelerate(random_model(MoEConfig.from_preset("tiny", n_experts=8, max_seq_len=64)))


@pytest.fixture(params=["packed", "forward"])
def decoding(request, model, monkeypatch):
    """Every generation test through both ways of decoding after the prompt: the packed step and
    MoELlama.forward with the cache."""
    monkeypatch.setattr(model, "decode_step", PackedDecoder(model) if request.param == "packed" else None)
    return request.param


def prompts(vocab_size: int, lengths=(3, 11, 7)) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_k=20, seed=3),
                                      dict(temperature=0.8, top_p=0.9, seed=4)])
def test_cached_and_uncached_generation_agree(model, sampling, decoding):
    prompt = torch.tensor(prompts(model.config.vocab_size, lengths=(6, 6)))
    cached = generate(model, prompt, 30, use_cache=True, **sampling)
    assert cached.shape == (2, 36) and torch.equal(cached[:, :6], prompt)
    assert torch.equal(cached, generate(model, prompt, 30, use_cache=False, **sampling))


@pytest.mark.parametrize("use_cache", [True, False])
def test_ragged_batch_equals_each_prompt_alone(model, use_cache, decoding):
    rows = prompts(model.config.vocab_size)
    batched = model.generate(rows, 25, temperature=0, use_cache=use_cache)
    assert [len(row) for row in batched] == [len(p) + 25 for p in rows]
    assert batched == [model.generate(row, 25, temperature=0, use_cache=use_cache) for row in rows]
    assert len({tuple(row[len(p):]) for row, p in zip(batched, rows)}) == 3


def test_sampling_is_reproducible_and_filters_apply(model, decoding):
    prompt = torch.tensor(prompts(model.config.vocab_size, lengths=(5,)))
    a = generate(model, prompt, 30, temperature=1.0, top_p=0.95, seed=7)
    assert torch.equal(a, generate(model, prompt, 30, temperature=1.0, top_p=0.95,
                                   generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(a, generate(model, prompt, 30, temperature=1.0, top_p=0.95, seed=8))
    greedy = generate(model, prompt, 30, temperature=0)
    assert torch.equal(generate(model, prompt, 30, temperature=1.5, top_k=1, seed=0), greedy)


def test_stream_receives_every_new_token_and_eos_stops_a_row(model, decoding):
    rows = prompts(model.config.vocab_size)
    seen = []
    out = model.generate(rows, 8, temperature=0, stream=seen.append)
    assert [[step[b] for step in seen] for b in range(3)] == [row[len(p):] for row, p in zip(out, rows)]
    eos_id = out[1][len(rows[1]) + 3]
    stopped = model.generate(rows, 8, temperature=0, eos_id=eos_id)
    assert stopped[1] == out[1][: out[1].index(eos_id, len(rows[1])) + 1]


@pytest.mark.parametrize("name", ["top2-gqa", "top2-tied-mha"])
def test_greedy_tokens_equal_mixtrals_generate(name):
    hf, ours = hf_and_ours(PARITY_CONFIGS[name])
    accelerate(ours)
    prompt = torch.randint(0, ours.config.vocab_size, (1, 5))
    expected = hf.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 40, temperature=0), expected)
    assert torch.equal(ours.generate(prompt, 40, temperature=0, use_cache=False), expected)
