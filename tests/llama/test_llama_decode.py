"""The one-token decode step on packed weights (decode.py) computes what Llama.forward computes."""

import pytest
import torch

from fromscratch.llama import decode
from fromscratch.llama.decode import (
    PackedLlama,
    blocked_matmul,
    column_blocks,
    n_column_blocks,
)
from fromscratch.llama.model import Llama, LlamaConfig

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
    """Kept on the model between calls, remade once its weights change in place or are replaced."""
    model = _model(CONFIGS["gqa"])
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    first = PackedLlama.of(model)
    assert PackedLlama.of(model) is first
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight.mul_(-3.0)  # as an optimizer step would
    second = PackedLlama.of(model)
    assert second is not first
    assert torch.equal(model.generate(prompt, 12, temperature=0),
                       model.generate(prompt, 12, temperature=0, use_cache=False))
    model.load_state_dict(_model(CONFIGS["gqa"]).state_dict())
    assert PackedLlama.of(model) is not second
    assert torch.equal(model.generate(prompt, 12, temperature=0),
                       model.generate(prompt, 12, temperature=0, use_cache=False))


def test_a_model_made_in_inference_mode_is_packed_afresh_each_time():
    with torch.inference_mode():  # its parameters keep no version counter
        model = _model(CONFIGS["gqa"])
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    first = PackedLlama.of(model)
    assert PackedLlama.of(model) is not first
    assert torch.equal(model.generate(prompt, 12, temperature=0),
                       model.generate(prompt, 12, temperature=0, use_cache=False))


def test_only_small_cpu_models_are_packed(monkeypatch):
    model = _model(CONFIGS["mha"])
    assert PackedLlama.suits(model)
    monkeypatch.setattr(decode, "PACK_MAX_BYTES", 1000)
    assert not PackedLlama.suits(model)
