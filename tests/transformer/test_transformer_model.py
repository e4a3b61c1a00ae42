"""The Transformer model: parity with torch.nn.Transformer, configs, masks, tying, learning."""

import json
import math

import pytest
import torch
import torch.nn as nn

from fromscratch.errors import UserError
from fromscratch.transformer.model import (
    EncoderLayer,

    LayerNorm,
    Transformer,
    TransformerConfig,
    sinusoidal_positions,
)


def tiny(**overrides) -> TransformerConfig:
    return TransformerConfig.from_preset("tiny", **{"vocab_size": 50, "dropout": 0.0, **overrides})


def padded_batch(vocab_size=50, lengths=(7, 4, 5), max_len=7, pad_id=0):
    ids = torch.randint(3, vocab_size, (len(lengths), max_len))
    for row, n in enumerate(lengths):
        ids[row, n:] = pad_id
    return ids


# --- parity with PyTorch's nn.Transformer -----------------------------------------------------


def copy_into_pytorch(model: Transformer) -> nn.Transformer:
    """An nn.Transformer holding our weights. Its stacks always end with a LayerNorm; for post-norm
    (where ours have none) that becomes the identity. Left in training mode (its dropout is 0):
    in eval mode its encoder takes a "fast path" that writes zeros at padded positions."""
    c = model.config
    reference = nn.Transformer(
        c.d_model, c.n_heads, c.n_encoder_layers, c.n_decoder_layers, c.d_ff, dropout=0.0,
        layer_norm_eps=c.norm_eps, batch_first=True, norm_first=c.norm_first,
    )

    def attention(theirs, ours):
        theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        theirs.out_proj.load_state_dict(ours.out_proj.state_dict())

    def layer(theirs, ours):
        theirs.linear1.load_state_dict(ours.feed_forward.w_1.state_dict())
        theirs.linear2.load_state_dict(ours.feed_forward.w_2.state_dict())
        for i, norm in enumerate(ours.norms, start=1):
            getattr(theirs, f"norm{i}").load_state_dict(norm.state_dict())

    with torch.no_grad():
        for theirs, ours in zip(reference.encoder.layers, model.encoder_layers):
            attention(theirs.self_attn, ours.self_attention)
            layer(theirs, ours)
        for theirs, ours in zip(reference.decoder.layers, model.decoder_layers):
            attention(theirs.self_attn, ours.self_attention)
            attention(theirs.multihead_attn, ours.cross_attention)
            layer(theirs, ours)
    if c.norm_first:
        reference.encoder.norm.load_state_dict(model.encoder_norm.state_dict())
        reference.decoder.norm.load_state_dict(model.decoder_norm.state_dict())
    else:
        reference.encoder.norm = nn.Identity()
        reference.decoder.norm = nn.Identity()
    return reference


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_matches_pytorch_transformer(norm_first):
    model = Transformer(tiny(norm_first=norm_first)).eval()
    reference = copy_into_pytorch(model)
    src, tgt = padded_batch(lengths=(7, 4, 5)), padded_batch(lengths=(6, 6, 3), max_len=6)
    src_padding = src == model.config.pad_id  # PyTorch's masks say True = ignore
    causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1))
    with torch.no_grad():
        src_x, tgt_x = model.embed(src, model.src_embedding), model.embed(tgt, model.tgt_embedding)

        memory, src_mask = model.encode(src)
        expected_memory = reference.encoder(src_x, src_key_padding_mask=src_padding)
        torch.testing.assert_close(memory, expected_memory, atol=1e-5, rtol=1e-5)

        decoded = model.decode(tgt, memory, src_mask)
        expected = reference.decoder(tgt_x, memory, tgt_mask=causal, memory_key_padding_mask=src_padding)
        torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-5)

        expected_logits = model.output_projection(
            reference(src_x, tgt_x, tgt_mask=causal, src_key_padding_mask=src_padding,
                      memory_key_padding_mask=src_padding)
        )
        torch.testing.assert_close(model(src, tgt), expected_logits, atol=1e-5, rtol=1e-5)


def test_layer_norm_matches_pytorch():
    norm = LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 5, 16) * 4 + 2
    expected = nn.functional.layer_norm(x, (16,), norm.weight, norm.bias, eps=1e-5)
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


def test_sdpa_and_explicit_attention_give_the_same_logits():
    fused = Transformer(tiny(use_sdpa=True)).eval()
    explicit = Transformer(tiny(use_sdpa=False)).eval()
    explicit.load_state_dict(fused.state_dict())
    src, tgt = padded_batch(), padded_batch(lengths=(6, 2, 5), max_len=6)
    with torch.no_grad():
        torch.testing.assert_close(fused(src, tgt), explicit(src, tgt), atol=1e-5, rtol=1e-5)


# --- the pieces ---------------------------------------------------------------------------------


def test_sinusoidal_positions_follow_section_3_5():
    pe = sinusoidal_positions(50, 16)
    pos, i = 7, 3
    assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    # "for any fixed offset k, PE(pos+k) is a linear function of PE(pos)": a rotation per pair
    k, w = 5, 1 / 10000 ** (2 * i / 16)
    rotation = torch.tensor([[math.cos(k * w), -math.sin(k * w)], [math.sin(k * w), math.cos(k * w)]])
    pairs = pe[:, 2 * i : 2 * i + 2]
    torch.testing.assert_close(pairs[:-k] @ rotation, pairs[k:], atol=1e-5, rtol=1e-5)


def test_embeddings_are_scaled_and_positioned():
    model = Transformer(tiny()).eval()
    ids = torch.tensor([[5, 6, 7]])
    expected = model.src_embedding.weight[ids] * math.sqrt(64) + sinusoidal_positions(1024, 64)[:3]
    torch.testing.assert_close(model.embed(ids, model.src_embedding), expected)
    torch.testing.assert_close(model.embed(ids, model.src_embedding, start=4)[0, 0],
                               expected[0, 0] - model.positions[0] + model.positions[4])


def test_tied_embeddings_share_storage():
    model = Transformer(tiny())
    pointers = {model.src_embedding.weight.data_ptr(), model.tgt_embedding.weight.data_ptr(),
                model.output_projection.weight.data_ptr()}
    assert len(pointers) == 1
    untied = Transformer(tiny(share_embeddings=False))
    pointers = {untied.src_embedding.weight.data_ptr(), untied.tgt_embedding.weight.data_ptr(),
                untied.output_projection.weight.data_ptr()}
    assert len(pointers) == 3
    n_matrix = 64 * 50
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters()) == 2 * n_matrix


def test_initialisation():
    model = Transformer(TransformerConfig.from_preset("small", vocab_size=1000))
    assert model.src_embedding.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    w = model.encoder_layers[0].feed_forward.w_1.weight  # Xavier-uniform: bound √(6 / (fan_in + fan_out))
    assert w.abs().max().item() <= math.sqrt(6 / (256 + 1024)) + 1e-6
    assert (model.decoder_layers[0].cross_attention.q_proj.bias == 0).all()


def test_no_pytorch_layer_norm_or_attention_modules():
    model = Transformer(tiny(norm_first=True))
    allowed = (nn.Linear, nn.Embedding, nn.Dropout, nn.ModuleList)
    for name, module in model.named_modules():
        if module.__module__.startswith("torch.nn"):
            assert isinstance(module, allowed), name


# --- masks and limits ---------------------------------------------------------------------------


@pytest.mark.parametrize("norm_first", [False, True])
def test_extra_source_padding_changes_nothing(norm_first):
    model = Transformer(tiny(norm_first=norm_first)).eval()
    src, tgt = padded_batch(lengths=(7, 4, 5)), padded_batch(lengths=(6, 6, 6), max_len=6)
    more_padding = torch.cat([src, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(more_padding, tgt), model(src, tgt), atol=1e-5, rtol=1e-5)
        # and a row alone, unpadded, equals the same row in the padded batch
        torch.testing.assert_close(model(src[1:2, :4], tgt[1:2]), model(src, tgt)[1:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["bidirectional", "causal"])
def test_an_encoder_layer_at_one_position_equals_the_full_layer_there(norm_first, is_causal):
    """forward_at (the last layer of a model pooled at one position) gives the full layer's
    output at that position, and the same gradients for a loss read there."""
    torch.manual_seed(0)
    layer = EncoderLayer(tiny(norm_first=norm_first))
    x = torch.randn(3, 7, layer.self_attention.n_heads * layer.self_attention.head_dim, requires_grad=True)
    mask = (torch.arange(7)[None, :] < torch.tensor([7, 5, 6])[:, None])[:, None, None, :]  # padding
    index = torch.tensor([6, 2, 0])
    rows = torch.arange(3)
    full = layer(x, mask, is_causal=is_causal)[rows, index]
    at = layer.forward_at(x, index, mask, is_causal=is_causal)
    assert at.shape == (3, 1, x.size(-1))
    torch.testing.assert_close(at[:, 0], full, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(full)
    grads_full = torch.autograd.grad((full * weights).sum(), [x, *layer.parameters()])
    grads_at = torch.autograd.grad((at[:, 0] * weights).sum(), [x, *layer.parameters()])
    for g_full, g_at in zip(grads_full, grads_at):
        torch.testing.assert_close(g_at, g_full, rtol=1e-4, atol=1e-6)


def test_decoder_does_not_see_the_future():
    model = Transformer(tiny()).eval()
    src, tgt = padded_batch(), padded_batch(lengths=(6, 6, 6), max_len=6)
    changed = tgt.clone()
    changed[:, 4:] = torch.randint(3, 50, (3, 2))
    with torch.no_grad():
        torch.testing.assert_close(model(src, changed)[:, :4], model(src, tgt)[:, :4])


def test_sequences_longer_than_max_seq_len_are_refused():
    model = Transformer(tiny(max_seq_len=16)).eval()
    with pytest.raises(UserError, match="max_seq_len=16"):
        model(torch.randint(3, 50, (1, 17)), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(UserError, match="max_seq_len=16"):
        model(torch.randint(3, 50, (1, 5)), torch.ones(1, 17, dtype=torch.long))
    model(torch.randint(3, 50, (1, 16)), torch.ones(1, 16, dtype=torch.long))  # exactly fits
    # generation stops at the table's end instead of failing
    out = model.generate(torch.randint(3, 50, (1, 16)), max_new_tokens=100)
    assert out.size(1) <= 16


# --- configuration ------------------------------------------------------------------------------


def test_presets_and_table_3():
    base, big = TransformerConfig.from_preset("base"), TransformerConfig.from_preset("big")
    assert (base.d_model, base.n_heads, base.n_encoder_layers, base.d_ff, base.dropout) == (512, 8, 6, 2048, 0.1)
    assert (big.d_model, big.n_heads, big.n_decoder_layers, big.d_ff, big.dropout) == (1024, 16, 6, 4096, 0.3)
    assert TransformerConfig.from_preset("tiny", d_model=32).d_model == 32
    narrow = TransformerConfig.from_preset("narrow")  # `small` at three quarters of its width
    assert (narrow.d_model, narrow.n_heads, narrow.n_encoder_layers, narrow.n_decoder_layers, narrow.d_ff) == \
        (192, 4, 3, 3, 768)
    slim = TransformerConfig.from_preset("slim")  # the CPU recipe's: `small` at half its width
    assert (slim.d_model, slim.n_heads, slim.n_encoder_layers, slim.n_decoder_layers, slim.d_ff) == (128, 4, 3, 3, 512)
    assert set(TransformerConfig.PRESETS) == {"tiny", "small", "narrow", "slim", "base", "big"}
    with pytest.raises(UserError, match="tiny, small, narrow, slim, base, big"):
        TransformerConfig.from_preset("huge")


def test_config_json_round_trip_and_unknown_keys():
    config = tiny(norm_first=True, vocab_size=123)
    assert TransformerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(UserError, match="n_layers"):
        TransformerConfig.from_dict({**config.to_dict(), "n_layers": 3})
    with pytest.raises(UserError, match="divisible"):
        TransformerConfig(d_model=60, n_heads=8)


def test_state_dict_round_trip():
    model = Transformer(tiny()).eval()
    copy = Transformer(tiny()).eval()
    copy.load_state_dict(model.state_dict())
    src, tgt = padded_batch(), padded_batch(max_len=5)
    with torch.no_grad():
        assert torch.equal(copy(src, tgt), model(src, tgt))
    assert "positions" not in model.state_dict()  # derived from the config, not saved


# --- learning -----------------------------------------------------------------------------------


def test_a_tiny_model_learns_to_reverse():
    """Reversal needs attention to the right source position: the model must really use its
    cross-attention and positional encodings, not just the previous token. Post-norm, no
    warm-up, about 2 s."""
    torch.manual_seed(0)
    vocab, length = 12, 5
    config = tiny(vocab_size=vocab, dropout=0.0, d_ff=128)
    model = Transformer(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    bos, eos = torch.tensor([[config.bos_id]]), torch.tensor([[config.eos_id]])

    def batch(n):
        src = torch.randint(3, vocab, (n, length))
        target = torch.cat([src.flip(1), eos.expand(n, 1)], dim=1)
        return src, torch.cat([bos.expand(n, 1), target[:, :-1]], dim=1), target

    losses = []
    for _ in range(120):
        src, tgt_in, target = batch(64)
        loss = nn.functional.cross_entropy(model(src, tgt_in).flatten(0, 1), target.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 * math.log(vocab)
    assert sum(losses[-10:]) / 10 < 0.2
    src, _, target = batch(64)
    output = model.generate(src, max_new_tokens=length + 1)
    output = nn.functional.pad(output, (0, length + 1 - output.size(1)), value=config.pad_id)
    assert (output == target).all(dim=1).float().mean().item() > 0.8
