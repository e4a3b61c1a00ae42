"""The opt-in fast paths (fast.py) compute what model.py computes: the one-token decode step on
packed weights equals Llama.forward, accelerated training equals plain training, and a block the
fast path does not know is never run through it."""

import pytest
import torch
import torch.nn as nn

import fromscratch.fast.packed
from fromscratch.llama import fast
from fromscratch.llama.config import LlamaConfig
from fromscratch.llama.fast import (
    PackedDecoder,
    PackedLlama,
    accelerate,
    blocked_matmul,
    column_blocks,
    n_column_blocks,
)
from fromscratch.llama.model import FeedForward, Llama

CONFIGS = {
    "mha": LlamaConfig.from_preset("tiny", n_kv_heads=None),
    "gqa": LlamaConfig.from_preset("tiny", n_heads=8, n_kv_heads=2, n_layers=3),
    "mqa": LlamaConfig.from_preset("tiny", n_kv_heads=1),
    "tied": LlamaConfig.from_preset("stories260k", n_layers=2),
    "explicit-attention": LlamaConfig.from_preset("tiny", use_sdpa=False),
}


def _model(config: LlamaConfig) -> Llama:
    torch.manual_seed(0)
    model = Llama(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the 0.02 init, and non-trivial norm gains
            p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("n_blocks", [1, 2, 3, 6])
@pytest.mark.parametrize("rows", [1, 4])
def test_blocked_matmul_is_the_linear_product(n_blocks, rows):
    weight = torch.randn(12, 7)
    x = torch.randn(rows, 7)
    blocks = column_blocks(weight, n_blocks)
    assert blocks.shape == (n_blocks, 7, 12 // n_blocks) and blocks.is_contiguous()
    torch.testing.assert_close(blocked_matmul(x, blocks), x @ weight.T, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_block_counts_divide_the_columns_and_share_the_cores(threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    for d_out in (48, 96, 288, 864, 1536, 32000, 7, 1):
        n = n_column_blocks(d_out)
        assert d_out % n == 0
        assert n % threads == 0 or n < threads
    assert n_column_blocks(32000) == 2 * threads  # the classifier: two wide blocks per core
    assert 16 <= 288 // n_column_blocks(288) <= 24  # layer matrices: blocks of ~16 columns


@pytest.mark.parametrize("name", CONFIGS)
def test_step_logits_equal_the_full_forward(name):
    model = _model(CONFIGS[name])
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (2, 24))
    packed = PackedLlama(model)
    with torch.no_grad():
        full = model(input_ids)  # (2, 24, vocab)
        cache = model.new_cache(2, 24)
        model.hidden_states(input_ids[:, :8], cache=cache)  # the prompt, through Llama.forward
        steps = torch.stack([packed.step(input_ids[:, t], cache) for t in range(8, 24)], dim=1)
    assert cache.length == 24
    torch.testing.assert_close(steps, full[:, 8:], atol=1e-4, rtol=1e-5)


def test_step_with_left_padding_equals_each_row_alone():
    model = _model(CONFIGS["gqa"])
    vocab = model.config.vocab_size
    short, long = torch.randint(0, vocab, (1, 9)), torch.randint(0, vocab, (1, 15))
    batch = torch.cat([torch.cat([torch.zeros(1, 6, dtype=torch.long), short], dim=1), long])
    pad_lengths = torch.tensor([6, 0])
    packed = PackedLlama(model)
    with torch.no_grad():
        cache = model.new_cache(2, 15)
        model.hidden_states(batch[:, :10], cache=cache, pad_lengths=pad_lengths)
        steps = torch.stack([packed.step(batch[:, t], cache, pad_lengths) for t in range(10, 15)], dim=1)
        torch.testing.assert_close(steps[0], model(short)[0, 4:], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(steps[1], model(long)[0, 10:], atol=1e-4, rtol=1e-5)


def test_packed_weights_follow_the_models_weights():
    """Kept between calls, remade once the model's weights change in place or are replaced."""
    model = accelerate(_model(CONFIGS["gqa"]))
    decoder = model.decode_step
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    model.generate(prompt, 3, temperature=0)
    first = decoder.packed
    model.generate(prompt, 3, temperature=0)
    assert decoder.packed is first
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight.mul_(-3.0)  # as an optimizer step would
    assert torch.equal(model.generate(prompt, 12, temperature=0),
                       model.generate(prompt, 12, temperature=0, use_cache=False))
    second = decoder.packed
    assert second is not first
    model.load_state_dict(_model(CONFIGS["gqa"]).state_dict())
    assert torch.equal(model.generate(prompt, 12, temperature=0),
                       model.generate(prompt, 12, temperature=0, use_cache=False))
    third = decoder.packed
    assert third is not second
    w2 = model.layers[0].feed_forward.w2
    w2.weight = torch.nn.Parameter(-w2.weight.detach())  # a new Parameter object
    assert torch.equal(model.generate(prompt, 12, temperature=0),
                       model.generate(prompt, 12, temperature=0, use_cache=False))
    fourth = decoder.packed
    assert fourth is not third
    w2.weight.data = 2 * w2.weight.detach()  # the same Parameter on new storage
    assert torch.equal(model.generate(prompt, 12, temperature=0),
                       model.generate(prompt, 12, temperature=0, use_cache=False))
    assert decoder.packed is not fourth


def test_the_weights_are_checked_once_a_search(monkeypatch):
    """`generate` takes the packed step once for its whole search (`for_one_search`)."""
    model = accelerate(_model(CONFIGS["gqa"]))
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    expected = model.generate(prompt, 12, temperature=0, use_cache=False)
    checks = []
    real_key = PackedDecoder.weights_key
    monkeypatch.setattr(PackedDecoder, "weights_key", lambda self: checks.append(1) or real_key(self))
    assert torch.equal(model.generate(prompt, 12, temperature=0), expected)
    assert len(checks) == 1


def test_a_model_made_in_inference_mode_is_packed_afresh_each_time():
    with torch.inference_mode():  # its parameters keep no version counter
        model = accelerate(_model(CONFIGS["gqa"]))
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    model.generate(prompt, 2, temperature=0)
    first = model.decode_step.packed
    assert torch.equal(model.generate(prompt, 12, temperature=0),
                       model.generate(prompt, 12, temperature=0, use_cache=False))
    assert model.decode_step.packed is not first


def test_only_small_cpu_models_are_packed(monkeypatch):
    model = _model(CONFIGS["mha"])
    assert PackedDecoder.supports(model)
    monkeypatch.setattr(fromscratch.fast.packed, "PACK_MAX_BYTES", 1000)
    assert not PackedDecoder.supports(model)
    assert accelerate(model).decode_step is None


class GatedFeedForward(FeedForward):
    """A different feed-forward (it doubles SwiGLU's output): the packed step does not know it."""

    def forward(self, x):
        return 2 * super().forward(x)


class OtherLlama(Llama):
    @staticmethod
    def make_block(layer_index, config):
        block = Llama.make_block(layer_index, config)
        block.feed_forward = GatedFeedForward(config)
        return block


def test_a_block_the_fast_path_does_not_know_never_runs_packed(monkeypatch):
    """A subclass with another feed-forward decodes through Llama.forward (and is right); the
    stock model does run the packed step, which is where its documented speed comes from."""
    calls = []
    real_step = PackedLlama.step
    monkeypatch.setattr(PackedLlama, "step", lambda self, *a, **k: calls.append(1) or real_step(self, *a, **k))
    torch.manual_seed(0)
    other = accelerate(OtherLlama(CONFIGS["gqa"]).eval())
    assert other.decode_step is None
    prompt = torch.randint(0, other.config.vocab_size, (1, 5))
    cached = other.generate(prompt, 10, temperature=0)
    assert calls == [] and torch.equal(cached, other.generate(prompt, 10, temperature=0, use_cache=False))
    stock = accelerate(_model(CONFIGS["gqa"]))
    stock.generate(prompt, 10, temperature=0)
    assert len(calls) == 9  # every step after the prompt


def test_a_block_swapped_after_accelerate_decodes_through_forward(monkeypatch):
    """Whether the packed step applies is checked again whenever the weights change, not at every
    step: swapping in a feed-forward it does not know brings new parameters, so the next step sees
    it and decodes through Llama.forward, and equals uncached decoding."""
    calls = []
    real_step = PackedLlama.step
    monkeypatch.setattr(PackedLlama, "step", lambda self, *a, **k: calls.append(1) or real_step(self, *a, **k))
    model = accelerate(_model(CONFIGS["gqa"]))
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    model.generate(prompt, 4, temperature=0)
    assert len(calls) == 3 and model.decode_step.packed is not None
    torch.manual_seed(1)
    model.layers[1].feed_forward = GatedFeedForward(model.config)
    cached = model.generate(prompt, 10, temperature=0)
    assert len(calls) == 3 and model.decode_step.packed is None
    assert torch.equal(cached, model.generate(prompt, 10, temperature=0, use_cache=False))


def test_accelerate_keeps_parameters_and_computes_the_same():
    """Training products through gemm.Linear and the loss without full logits: same parameters
    (tying included), same loss and gradients as the plain model."""
    config = CONFIGS["tied"]
    plain, fast_model = _model(config), _model(config)
    before = {name: p for name, p in fast_model.named_parameters()}
    accelerate(fast_model)
    assert {name: p for name, p in fast_model.named_parameters()} == before  # the very same Parameters
    assert fast_model.output.weight is fast_model.tok_embeddings.weight
    assert all(type(m) is not nn.Linear for m in fast_model.modules())
    ids = torch.randint(0, config.vocab_size, (3, 17))
    losses = []
    for model in (plain, fast_model):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fast_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
