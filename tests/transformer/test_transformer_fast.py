"""The Transformer's opt-in fast paths (fast.py) compute what model.py computes: the packed
one-token step equals Transformer.decode, accelerated training equals plain training, and a layer
the fast path does not know is never run through it."""

import pytest
import torch
import torch.nn.functional as F

from fromscratch.errors import UserError
from fromscratch.fast.dropout import Dropout
from fromscratch.transformer import Transformer, TransformerConfig
from fromscratch.transformer import decoding, fast
from fromscratch.transformer.fast import PackedTransformer, accelerate
from fromscratch.transformer.model import DecoderLayer, FeedForward

CONFIGS = {
    "post-norm": dict(),
    "pre-norm": dict(norm_first=True),
    "marian-like": dict(activation="swish", positions="halves", logits_bias=True, decoder_start_id=0),
    "untied": dict(share_embeddings=False),
}


def _model(**overrides) -> Transformer:
    torch.manual_seed(0)
    config = TransformerConfig.from_preset("tiny", vocab_size=40, dropout=0.0, max_seq_len=64, **overrides)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # far from the initialisation, norms and biases included
            p.add_(0.3 * torch.randn_like(p))
    return model


def _sources():
    src = torch.randint(3, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    src[1, 6:] = 0  # padding
    return src


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("rows", ["one", "few", "many"])
def test_packed_step_equals_the_decoder(name, rows, monkeypatch):
    if rows == "many":  # a wide beam or a large batch: the products go through the layers, the norms take two passes
        monkeypatch.setattr(fast, "PACKED_ROWS", 0)
        monkeypatch.setattr(fast, "VAR_MEAN_ROWS", 0)
    model = _model(**CONFIGS[name])
    # One row (a padded source): the products' outputs are views, and the cross-attention is folded
    # (4 heads × 9 source tokens < d_model 64).
    src = _sources()[1:2] if rows == "one" else _sources()
    prefix = torch.randint(3, 40, (src.size(0), 8))
    with torch.no_grad():
        memory, src_mask = model.encode(src)
        full = model.logits(model.decode(prefix, memory, src_mask))
        packed, cache = PackedTransformer(model), model.new_cache(16)
        steps = torch.stack([packed.step(prefix[:, t], memory, src_mask, cache) for t in range(8)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)
    assert cache.length == 8
    assert all((layer.folded is not None) == (rows == "one") for layer in packed.layers)


def test_folded_cross_attention_follows_each_search_and_only_where_it_streams_less():
    """One source at a time, each search folds its own source (a stale fold would attend to the
    previous one); a source of d_k tokens or more (4 heads × 16 ≥ d_model 64) is not folded."""
    plain, accelerated = _model(), accelerate(_model())
    torch.manual_seed(2)
    for length in (9, 5, 16, 20):
        src = torch.randint(3, 40, (1, length))
        for beam_size in (1, 4):
            assert torch.equal(accelerated.generate(src, max_new_tokens=12, beam_size=beam_size),
                               plain.generate(src, max_new_tokens=12, beam_size=beam_size))
        folded = accelerated.decode_step.packed.layers[0].folded
        assert (folded is not None and folded[2].src_len == length) == (length < 16)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_accelerated_generation_gives_the_plain_models_tokens(beam_size):
    plain, accelerated = _model(), accelerate(_model())
    assert accelerated.decode_step is not None
    src = _sources()
    assert torch.equal(accelerated.generate(src, max_new_tokens=12, beam_size=beam_size),
                       plain.generate(src, max_new_tokens=12, beam_size=beam_size))


@pytest.mark.parametrize("name", ["post-norm", "pre-norm", "marian-like"])
@pytest.mark.parametrize("style", ["gnmt", "hf"])
@pytest.mark.parametrize("pool", [1, 3])
def test_a_pool_of_sources_translates_each_as_it_would_alone(pool, style, name, monkeypatch):
    """Beam search with a pool: each source that is done gives its rows to the next, which starts
    at position 0 beside the others (its own positions, a self-attention mask), with its encoder
    output and cross-attention keys written into the row (the row widened when it is the longest
    so far; one source: the folded cross-attention made anew). Every source's translation is the
    one it gets alone, with its own length + 50 as its limit."""
    model = accelerate(_model(**CONFIGS[name]))
    generator = torch.Generator().manual_seed(3)
    lengths = [7, 4, 2, 6, 12, 3, 9, 5]  # the first the longest: later ones fit its row (one source: folded)
    src = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, n in enumerate(lengths):
        src[row, :n] = torch.randint(3, 40, (n,), generator=generator)
    admitted = []
    admit = decoding.SourcePool.admit
    monkeypatch.setattr(decoding.SourcePool, "admit", lambda self, rows, sources: (
        admitted.extend(sources.tolist()), admit(self, rows, sources))[1])
    for max_new_tokens in (10, None):
        admitted.clear()
        pooled = model.generate(src, max_new_tokens=max_new_tokens, beam_size=3, pool=pool, length_penalty=1.0,
                                length_penalty_style=style)
        assert admitted == list(range(pool, len(lengths)))  # in order, each once
        for row, n in enumerate(lengths):
            alone = model.generate(src[row:row + 1, :n], max_new_tokens=max_new_tokens, beam_size=3,
                                   length_penalty=1.0, length_penalty_style=style)[0]
            assert pooled[row, :len(alone)].tolist() == alone.tolist()
            assert set(pooled[row, len(alone):].tolist()) <= {model.config.pad_id}


def test_a_pool_decodes_in_turn_where_it_cannot_keep_a_batch_full():
    """Greedy decoding, a model without the packed step, or an n-gram ban: `pool` sources at a
    time, in turn, each batch as it would be alone."""
    plain, accelerated, src = _model(), accelerate(_model()), _sources()
    for model, beam_size, ngram in ((accelerated, 1, 0), (plain, 3, 0), (accelerated, 3, 2)):
        pooled = model.generate(src, max_new_tokens=8, beam_size=beam_size, pool=2, no_repeat_ngram_size=ngram)
        parts = [model.generate(src[i:i + 2], max_new_tokens=8, beam_size=beam_size, no_repeat_ngram_size=ngram)
                 for i in (0, 2)]
        for row, expected in zip(pooled, [*parts[0], *parts[1]]):
            assert row[:len(expected)].tolist() == expected.tolist()
    with pytest.raises(UserError, match="pool must be at least 1 source, got 0"):
        plain.generate(src, beam_size=3, pool=0)


def test_packed_weights_follow_the_models_weights():
    model = accelerate(_model())
    src = _sources()
    model.generate(src, max_new_tokens=3)
    first = model.decode_step.packed
    with torch.no_grad():
        model.decoder_layers[0].feed_forward.w_2.weight.mul_(-2.0)  # as an optimizer step would
    assert torch.equal(model.generate(src, max_new_tokens=10), model.generate(src, max_new_tokens=10, use_cache=False))
    assert model.decode_step.packed is not first


@pytest.mark.parametrize("beam_size", [1, 4])
def test_the_weights_are_checked_once_a_search(beam_size, monkeypatch):
    """A search takes the packed step once (`for_one_search`): nothing can change the weights
    while it runs, and checking them before every token cost ~0.15 ms of a ~6 ms step."""
    model = accelerate(_model())
    src = _sources()
    expected = model.generate(src, max_new_tokens=10, beam_size=beam_size, use_cache=False)
    checks = []
    real_key = fast.PackedDecoder.weights_key
    monkeypatch.setattr(fast.PackedDecoder, "weights_key", lambda self: checks.append(1) or real_key(self))
    assert torch.equal(model.generate(src, max_new_tokens=10, beam_size=beam_size), expected)
    assert len(checks) == 1
    src[1, 6:] = 5  # no padding: no source mask is built, the same tokens come out
    assert torch.equal(model.generate(src, max_new_tokens=10, beam_size=beam_size),
                       model.generate(src, max_new_tokens=10, beam_size=beam_size, use_cache=False))


def test_packed_weights_follow_a_fused_optimizer_step():
    """PyTorch's fused AdamW writes the weights without bumping their version counters (the
    engine's optimizer): the packed copy must still be made anew, or evaluation during training
    would decode with the weights of the evaluation before."""
    model = accelerate(_model())
    src = _sources()
    model.generate(src, max_new_tokens=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    versions = [p._version for p in model.parameters()]
    optimizer.step()
    assert versions == [p._version for p in model.parameters()]  # why the key counts optimizer steps
    assert torch.equal(model.generate(src, max_new_tokens=10), model.generate(src, max_new_tokens=10, use_cache=False))


class DoubledFeedForward(FeedForward):
    def forward(self, x):
        return 2 * super().forward(x)


def test_a_layer_the_fast_path_does_not_know_never_runs_packed(monkeypatch):
    calls = []
    real_step = PackedTransformer.step
    monkeypatch.setattr(PackedTransformer, "step", lambda self, *a: calls.append(1) or real_step(self, *a))
    model = _model()
    for layer in model.decoder_layers:
        assert type(layer) is DecoderLayer
        layer.feed_forward = DoubledFeedForward(64, 256)
    accelerate(model)
    assert model.decode_step is None
    src = _sources()
    assert torch.equal(model.generate(src, max_new_tokens=8), model.generate(src, max_new_tokens=8, use_cache=False))
    assert calls == []
    accelerate(_model()).generate(src, max_new_tokens=8)
    assert calls  # the stock decoder does run packed


@pytest.mark.parametrize("name", ["post-norm", "marian-like"])
def test_accelerated_training_loss_and_gradients_equal_the_plain_ones(name):
    """The label-smoothed loss without full logits: same value and gradients as F.cross_entropy
    on the plain model's logits (the keys' biases get none: softmax ignores a shift of every score)."""
    plain, accelerated = _model(**CONFIGS[name]).train(), accelerate(_model(**CONFIGS[name])).train()
    src = _sources()
    tgt = torch.randint(3, 40, (3, 7))
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:].clone()
    tgt_out[2, 3:] = 0  # padding, ignored
    config = plain.config
    torch.manual_seed(5)
    expected = F.cross_entropy(plain(src, tgt_in).flatten(0, 1), tgt_out.flatten(), ignore_index=config.pad_id,
                               reduction="sum", label_smoothing=0.1)
    torch.manual_seed(5)  # dropout is 0; the seed only makes sure nothing else differs
    got = accelerated(src, tgt_in, targets=tgt_out, label_smoothing=0.1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    expected.backward()
    got.backward()
    scale = max(float(p.grad.abs().max()) for p in plain.parameters())  # rounding grows with it
    for (name_, p), q in zip(plain.named_parameters(), accelerated.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5 * scale, rtol=1e-4, msg=name_)


@pytest.mark.parametrize("name", ["post-norm", "pre-norm", "marian-like"])
@pytest.mark.parametrize("padded", ["both", "target"])  # "target": every source position is real (views)
def test_padding_free_training_computes_only_real_positions_and_equals_the_plain_loss(name, padded):
    """fast.padding_free_loss: the FFNs see the real positions only (here 25 of 33 source and 14
    of 21 target positions, one of them a masked-out target inside its row, which the positions
    after it still read); the loss equals the plain model's, and the loss and every gradient
    equal those of the same fast kernels on the padded layout (the hook off)."""
    plain, accelerated = accelerate(_model(**CONFIGS[name])).train(), accelerate(_model(**CONFIGS[name])).train()
    assert accelerated.teacher_forced_loss is fast.padding_free_loss
    plain.teacher_forced_loss = None
    src = torch.randint(3, 40, (3, 11), generator=torch.Generator().manual_seed(3))
    if padded == "both":
        src[0, 4:], src[1, 10:] = 0, 0  # 4 + 10 + 11 real source positions
    tgt = torch.randint(3, 40, (3, 8), generator=torch.Generator().manual_seed(4))
    tgt_in, tgt_out = tgt[:, :-1].clone(), tgt[:, 1:].clone()
    tgt_out[0, 2:], tgt_out[2, 5:] = 0, 0
    tgt_out[1, 3] = 0  # a masked-out target inside the row: its position still feeds the ones after it
    tgt_in[0, 3:], tgt_in[2, 6:] = 0, 0  # the decoder's input is padded one position later
    rows_seen = []
    for layer in [*accelerated.encoder_layers, *accelerated.decoder_layers]:
        layer.feed_forward.register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[:-1]))
    with torch.no_grad():
        model_py = F.cross_entropy(_model(**CONFIGS[name])(src, tgt_in).flatten(0, 1), tgt_out.flatten(),
                                   ignore_index=0, reduction="sum", label_smoothing=0.1)
    expected = plain(src, tgt_in, targets=tgt_out, label_smoothing=0.1)
    got = accelerated(src, tgt_in, targets=tgt_out, label_smoothing=0.1)
    torch.testing.assert_close(got, model_py, atol=1e-4, rtol=1e-5)
    n_src, n_tgt = int((src != 0).sum()), 2 + 7 + 5  # each row up to its last real target
    assert n_src == (25 if padded == "both" else 33)
    assert rows_seen == [torch.Size([n_src])] * 2 + [torch.Size([n_tgt])] * 2
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    expected.backward()
    got.backward()
    scale = max(float(p.grad.abs().max()) for p in plain.parameters())
    for (name_, p), q in zip(plain.named_parameters(), accelerated.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6 * scale, rtol=1e-5, msg=name_)


def test_padding_free_training_leaves_unpadded_batches_and_unknown_layers_to_the_plain_route():
    accelerated = accelerate(_model()).train()
    rows_seen = []
    accelerated.encoder_layers[0].feed_forward.register_forward_hook(
        lambda m, args, out: rows_seen.append(args[0].shape))
    src, tgt = torch.randint(3, 40, (2, 5)), torch.randint(3, 40, (2, 4))
    accelerated(src, tgt[:, :-1], targets=tgt[:, 1:])
    assert rows_seen == [torch.Size([2, 5, 64])]  # no padding: the (B, S, d) layout, no packing

    model = _model()
    model.encoder_layers[0].__class__ = type("Subclass", (model.encoder_layers[0].__class__,), {})
    assert accelerate(model).teacher_forced_loss is None


def test_accelerate_gives_every_dropout_the_cheaper_mask():
    """Every nn.Dropout becomes fast.dropout.Dropout (a quarter of the random draws): active in
    training, reproducible under a seed, the identity in eval mode."""
    torch.manual_seed(0)
    plain = Transformer(TransformerConfig.from_preset("tiny", vocab_size=40, dropout=0.3))
    accelerated = accelerate(Transformer(plain.config))
    accelerated.load_state_dict(plain.state_dict())
    dropouts = [m for m in accelerated.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(type(m) is Dropout for m in dropouts)
    src, tgt = _sources(), torch.randint(3, 40, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(accelerated.eval()(src, tgt), plain.eval()(src, tgt))
        accelerated.train()
        torch.manual_seed(1)
        first = accelerated(src, tgt)
        torch.manual_seed(1)
        assert torch.equal(accelerated(src, tgt), first)
        assert not torch.allclose(first, plain(src, tgt), atol=1e-3)


def test_cpu_bfloat16_training_takes_the_written_out_attention_and_rounds_no_worse(monkeypatch):
    """Under CPU autocast in bfloat16 (`--dtype bfloat16`) the fused attention skips PyTorch's
    slow CPU bfloat16 flash kernel; its loss and gradients are as close to float32 as those of
    the plain model under the same autocast."""
    src = _sources()
    tgt = torch.randint(3, 40, (3, 7), generator=torch.Generator().manual_seed(2))

    def loss_and_gradient(model, bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            loss = model.train()(src, tgt[:, :-1], targets=tgt[:, 1:], label_smoothing=0.1)
        loss.backward()
        return loss.float(), torch.cat([p.grad.flatten() for p in model.parameters()])

    expected_loss, expected_grad = loss_and_gradient(_model(norm_first=True), bfloat16=False)
    plain_loss, plain_grad = loss_and_gradient(_model(norm_first=True), bfloat16=True)

    def flash(*args, **kwargs):
        raise AssertionError("the CPU bfloat16 flash kernel ran")

    monkeypatch.setattr(F, "scaled_dot_product_attention", flash)
    loss, grad = loss_and_gradient(accelerate(_model(norm_first=True)), bfloat16=True)
    assert abs(loss - expected_loss) <= max(abs(plain_loss - expected_loss), 2**-8 * expected_loss)  # bf16's ε
    assert (grad - expected_grad).norm() <= 1.25 * (plain_grad - expected_grad).norm()


@pytest.mark.parametrize("offset", [0.0, 100.0])  # far from zero: the two-pass variance stays exact
@pytest.mark.parametrize("grad", [False, True])
def test_fast_layer_norm_equals_torchs_layer_norm(offset, grad):
    """FastLayerNorm (two-pass statistics, written-out backward) against torch.nn.LayerNorm with
    the same weights: outputs, and the gradients of the input, γ and β."""
    torch.manual_seed(0)
    ours, reference = fast.FastLayerNorm(48, eps=1e-5), torch.nn.LayerNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    reference.load_state_dict(ours.state_dict())
    x = (torch.randn(4, 7, 48) * 3 + offset).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y, expected = ours(x), reference(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    if grad:
        upstream = torch.randn_like(y)
        ours_grads = torch.autograd.grad(y, (x, ours.weight, ours.bias), upstream)
        reference_grads = torch.autograd.grad(expected, (x, reference.weight, reference.bias), upstream)
        for a, b in zip(ours_grads, reference_grads):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("accelerated", [False, True])
def test_compiled_training_reuses_one_graph_across_batch_shapes(accelerated):
    """Token-bucket batches change (sentences, source length, target length) at almost every step.
    Under torch.compile the model must not break its graph nor compile once per shape: the first
    shape compiles, the second recompiles with the sizes symbolic, and every later batch reuses that.
    (The attention's is_causal once became a symbolic boolean that SDPA refuses: every layer broke
    its graph; the chunked loss loops in Python over the rows: it broke too.) The loss and its
    gradients equal the eager model's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    config = TransformerConfig.from_preset("tiny", vocab_size=300, dropout=0.0)  # so eager draws no other mask
    torch.manual_seed(0)
    model = Transformer(config)
    if accelerated:
        accelerate(model)
    compiled = torch.compile(model, backend="eager")  # dynamo alone: no code generation, fast
    generator = torch.Generator().manual_seed(0)
    for b, s, t in [(8, 12, 14), (6, 20, 18), (12, 9, 10), (5, 25, 30), (7, 16, 11), (4, 31, 28)]:
        src = torch.randint(3, 300, (b, s), generator=generator)
        src[0, -2:] = config.pad_id
        tgt_in, tgt_out = torch.randint(3, 300, (2, b, t), generator=generator)
        loss = compiled(src, tgt_in, targets=tgt_out, label_smoothing=0.1)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        expected = model(src, tgt_in, targets=tgt_out, label_smoothing=0.1)
        expected.backward()
        torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-5)
        for grad, p in zip(grads, model.parameters()):
            torch.testing.assert_close(grad, p.grad, atol=1e-4, rtol=1e-4)
        model.zero_grad()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2
