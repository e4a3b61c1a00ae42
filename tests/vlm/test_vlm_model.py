"""The VLM (CoCa): its two losses, the [CLS] text embedding, decoding with and without the KV cache,
the image's keys and values projected once, cross-attention maps, the tokenizer and the fast path."""

import copy

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fromscratch.errors import UserError
from fromscratch.transformer.model import DecoderLayer, EncoderLayer
from fromscratch.vlm import VLM, VLMConfig, WordTokenizer, accelerate, coca_loss, contrastive_loss
from fromscratch.vlm import decoding
from fromscratch.vlm.figures import plot_attention_maps, plot_patch_grid, plot_similarity_matrix
from fromscratch.vlm.training import sequence

TEXTS = ["a red circle in the center", "there are two objects: a blue 7 and a green square",
         "what color is the circle?", "red", "how many objects are there?", "2", "is the 7 above the square?", "no"]


@pytest.fixture(scope="module")
def tokenizer():
    return WordTokenizer.train(TEXTS)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    model = VLM(VLMConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size), tokenizer).eval()
    with torch.no_grad():  # larger logits than at initialisation, so that decoding has clear winners
        model.output_projection.weight.mul_(30)
    return model


def images(n=3, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --- the tokenizer ---------------------------------------------------------------------------


def test_tokenizer_round_trip_specials_and_unknown_words(tokenizer, tmp_path):
    assert [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.sep_id] == [0, 1, 2, 3, 4]
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode("What color is the circle?")  # lower-cased; "?" a token of its own
    assert tokenizer.id_to_token(ids[-1]) == "?" and tokenizer.id_to_token(ids[0]) == "what"
    a, circle = tokenizer.encode("a circle")
    assert tokenizer.encode("a purple circle") == [a, tokenizer.unk_id, circle]
    assert tokenizer.decode([1, *tokenizer.encode("red circle"), 4, *tokenizer.encode("2"), 2, 0, 0]) == "red circle 2"
    assert WordTokenizer.load(tokenizer.save(tmp_path)).encode_batch(TEXTS) == tokenizer.encode_batch(TEXTS)


# --- architecture and losses -----------------------------------------------------------------


def test_built_from_the_transformers_layers(model):
    assert all(type(layer) is EncoderLayer for layer in model.text.layers)  # unimodal: causal self-attention
    assert all(type(layer) is DecoderLayer for layer in model.multimodal_layers)  # + cross-attention to the image
    c = model.config
    assert [layer.self_attention.layer_index for layer in model.text.layers] == list(range(c.n_unimodal_layers))
    assert [layer.cross_attention.layer_index for layer in model.multimodal_layers] == list(
        range(c.n_unimodal_layers, c.n_text_layers))


def test_vqa_targets_count_the_answer_only(model, tokenizer):
    c = model.config
    question, answer = tokenizer.encode("what color is the circle?"), tokenizer.encode("red")
    tokens, targets = sequence(c, [*question, c.sep_id], answer)
    assert tokens == [c.bos_id, *question, c.sep_id, *answer]
    assert targets == [c.pad_id] * (len(question) + 1) + [*answer, c.eos_id]
    caption = tokenizer.encode("a red circle in the center")
    assert sequence(c, [], caption) == ([c.bos_id, *caption], [*caption, c.eos_id])


def test_coca_loss_is_the_weighted_sum_of_captioning_and_contrastive_losses(model, tokenizer):
    c = model.config
    rows = [sequence(c, [], tokenizer.encode(TEXTS[0])), sequence(c, [*tokenizer.encode(TEXTS[2]), c.sep_id],
                                                                 tokenizer.encode("red")),
            sequence(c, [], tokenizer.encode(TEXTS[1])), sequence(c, [], tokenizer.encode(TEXTS[0]))]
    tokens = torch.nn.utils.rnn.pad_sequence([torch.tensor(r[0]) for r in rows], batch_first=True)
    targets = torch.nn.utils.rnn.pad_sequence([torch.tensor(r[1]) for r in rows], batch_first=True)
    image_index = torch.tensor([0, 0, 1, 2])
    is_caption = torch.tensor([True, False, True, True])
    pixels = model.pixels(images())
    out = model(pixels, tokens, image_index)
    total, n, parts = coca_loss(c, out, targets, image_index, is_caption)
    counted = targets != c.pad_id
    assert n == int(counted.sum()) == len(tokenizer.encode(TEXTS[0])) * 2 + len(tokenizer.encode(TEXTS[1])) + 3 + 2
    nll = F.cross_entropy(out.logits[counted], targets[counted], reduction="sum")
    expected_con = contrastive_loss(out.logit_scale * out.image_embeds @ out.text_embeds[[0, 2, 3]].t())
    torch.testing.assert_close(total, c.caption_loss_weight * nll + c.contrastive_loss_weight * expected_con * n)
    assert parts["contrastive"] == pytest.approx(expected_con.item(), rel=1e-5)
    # without captions (VQA data) there is no contrastive term
    _, _, vqa_only = coca_loss(c, out, targets, image_index, torch.zeros(4, dtype=torch.bool))
    assert "contrastive" not in vqa_only


def test_forward_shares_each_images_keys_values_and_equals_decode(model, tokenizer):
    """Training projects an image's keys and values once for all its texts; decoding each text
    against its own copy of the image gives the same logits and embeddings."""
    pixels = model.pixels(images())
    tokens = torch.randint(5, model.config.vocab_size, (6, 7))
    image_index = torch.tensor([0, 0, 1, 1, 2, 2])
    out = model(pixels, tokens, image_index)
    memory = model.image_memory(model.vision(pixels))[image_index]
    hidden, cls_state = model.decode(tokens, memory, with_cls=True)
    torch.testing.assert_close(out.logits, model.logits(hidden), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.text_embeds, model.text_embedding(cls_state), rtol=0, atol=1e-6)


def test_cls_is_invisible_to_the_tokens_and_ignores_padding(model, tokenizer):
    """The [CLS] sits after the text: the tokens' logits are the same with and without it; and
    the text embedding is the same alone or in a padded batch."""
    tokens = torch.tensor([[1, *tokenizer.encode(TEXTS[0])]])
    memory = model.image_memory(model.vision(model.pixels(images(1))))
    with_cls, _ = model.decode(tokens, memory, with_cls=True)
    without, none = model.decode(tokens, memory)
    assert none is None
    # float32 products over 6 and 7 positions may block and round differently: 1.2e-6 seen on an
    # AMD EPYC, over the 1e-6 this test first allowed.
    torch.testing.assert_close(with_cls, without, rtol=0, atol=1e-5)
    alone = model.embed_texts([TEXTS[0]])
    batched = model.embed_texts([TEXTS[1], TEXTS[0]])  # TEXTS[1] is longer: TEXTS[0] gets padding
    torch.testing.assert_close(batched[1:], alone, rtol=0, atol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(2))


# --- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("beam_size", [1, 3])
def test_cached_and_uncached_decoding_agree(model, tokenizer, beam_size):
    pixels = model.pixels(images(4))
    cached = decoding.caption_ids(model, pixels, beam_size, max_new_tokens=12, use_cache=True)
    uncached = decoding.caption_ids(model, pixels, beam_size, max_new_tokens=12, use_cache=False)
    assert cached.size(1) > 3 and torch.equal(cached, uncached)
    questions = tokenizer.encode_batch([TEXTS[2], TEXTS[4], TEXTS[2], TEXTS[6]])
    assert decoding.answer_ids(model, pixels, questions, 5, beam_size, use_cache=True) == \
        decoding.answer_ids(model, pixels, questions, 5, beam_size, use_cache=False)


def test_cache_gives_the_same_logits_step_by_step_and_projects_the_image_once(model):
    pixels = model.pixels(images(2))
    memory = model.image_memory(model.vision(pixels))
    prompt = torch.tensor([[1, 7, 8], [1, 9, 5]])
    calls = []
    hooks = [layer.cross_attention.k_proj.register_forward_hook(lambda *a: calls.append(1))
             for layer in model.multimodal_layers]
    try:
        cached = decoding.ImageNextToken(model, memory, use_cache=True, max_len=8)
        uncached = decoding.ImageNextToken(model, memory, use_cache=False, max_len=None)
        tokens = prompt
        for _ in range(4):
            a = cached(tokens)
            n_calls = len(calls)
            torch.testing.assert_close(a, uncached(tokens), rtol=0, atol=1e-4)
            calls = calls[:n_calls]  # count only the cached model's projections
            tokens = torch.cat([tokens, a.argmax(dim=-1, keepdim=True)], dim=1)
        assert cached.cache.length == tokens.size(1) - 1
        assert len(calls) == len(model.multimodal_layers)  # the image's keys: on the first step only
    finally:
        for hook in hooks:
            hook.remove()


def test_answers_of_different_lengths_decode_as_they_would_alone(model, tokenizer):
    pixels = model.pixels(images(3))
    questions = tokenizer.encode_batch([TEXTS[2], TEXTS[4], TEXTS[6]])
    together = decoding.answer_ids(model, pixels, questions, 5)
    alone = [decoding.answer_ids(model, pixels[i:i + 1], [q], 5)[0] for i, q in enumerate(questions)]
    assert together == alone
    answers = model.answer(images(3), [TEXTS[2], TEXTS[4], TEXTS[6]], max_new_tokens=5)
    assert answers == tokenizer.decode_batch(together)
    with pytest.raises(UserError, match="3 images but 2 questions"):
        model.answer(images(3), TEXTS[:2])


def test_never_generates_padding_start_separator_or_unknown(model):
    ids = decoding.caption_ids(model, model.pixels(images(4)), 1, 12)
    c = model.config
    eos_seen = (ids == c.eos_id).cumsum(dim=1) > 0
    produced = ids[~eos_seen | (ids == c.eos_id)]
    assert not set(produced.tolist()) & {c.pad_id, c.bos_id, c.sep_id, c.unk_id}


def test_a_prompt_that_fills_the_context_is_refused(model):
    memory = model.image_memory(model.vision(model.pixels(images(1))))
    prompt = torch.ones(1, model.config.max_text_len, dtype=torch.long)
    with pytest.raises(UserError, match="leaves no room"):
        decoding.generate(model, memory, prompt, 4)


# --- cross-attention maps and figures --------------------------------------------------------


def test_cross_attention_maps_are_distributions_over_patches_and_those_of_each_step(model):
    pixels = model.pixels(images(2))
    memory = model.image_memory(model.vision(pixels))
    prompt = torch.full((2, 1), model.config.bos_id)
    generated = decoding.caption_ids(model, pixels, 1, 6)
    maps = decoding.cross_attention_maps(model, pixels, prompt, generated)
    grid = model.config.image_size // model.config.patch_size
    assert maps.shape == (2, generated.size(1), grid, grid)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, generated.size(1)))
    assert (maps >= 0).all()
    # the same weights the cached decoder used at each step
    attentions = [layer.cross_attention for layer in model.multimodal_layers]
    step = decoding.ImageNextToken(model, memory, use_cache=True, max_len=16)
    tokens = prompt
    for attention in attentions:
        attention.record_weights = True
    try:
        for j in range(generated.size(1)):
            step(tokens)
            at_step = torch.stack([a.weights for a in attentions]).mean(dim=(0, 2))[:, -1]  # (B, N)
            torch.testing.assert_close(at_step, maps[:, j].flatten(1), rtol=0, atol=1e-5)
            tokens = torch.cat([tokens, generated[:, j:j + 1]], dim=1)
    finally:
        for attention in attentions:
            attention.record_weights, attention.weights = False, None


def test_figures_are_written(model, tmp_path):
    pytest.importorskip("matplotlib")
    for path in (plot_attention_maps(model, images(2), tmp_path / "maps.png"),
                 plot_patch_grid(images(1)[0], 8, tmp_path / "grid.png"),
                 plot_similarity_matrix(model, images(3), TEXTS[:3], tmp_path / "similarity.png")):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 200


# --- the user API ----------------------------------------------------------------------------


def test_images_from_pil_and_embeddings(model):
    pil = [Image.new("RGB", (50, 30), (255, 0, 0)), Image.new("L", (20, 20), 128)]
    pixels = model.pixels(pil)
    assert pixels.shape == (2, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    assert pixels[0, 0, 16, 16] == 1.0 and pixels[0, 0, 0, 0] == -1.0  # red inside, black padding bars
    embeds = model.embed_images(pil)
    assert embeds.shape == (2, model.config.embed_dim) and torch.allclose(embeds.norm(dim=-1), torch.ones(2))
    assert model.zero_shot(pil, TEXTS[:3]).shape == (2,)
    assert model.zero_shot(pil, [TEXTS[:3], TEXTS[3:6]]).shape == (2,)
    with pytest.raises(UserError, match="has no tokenizer"):
        VLM(model.config).caption(images(1))


def test_fast_path_computes_what_the_plain_model_computes(model, tokenizer):
    plain = copy.deepcopy(model).train()
    fast = accelerate(copy.deepcopy(model)).train()
    pixels = model.pixels(images(3))
    tokens = torch.randint(5, model.config.vocab_size, (6, 7))
    image_index = torch.tensor([0, 0, 1, 1, 2, 2])
    targets = torch.randint(5, model.config.vocab_size, (6, 7))
    losses = []
    for m in (plain, fast):
        total, _, _ = coca_loss(m.config, m(pixels, tokens, image_index), targets, image_index,
                                torch.tensor([True, False, True, False, True, False]))
        total.backward()
        losses.append(total)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-4)
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        # gradients reach ~10⁴ here (a summed loss of ~5·10³), where one float32 ulp is ~10⁻³:
        # a tolerance relative to each tensor's scale, not a fixed 10⁻⁴
        scale = a.grad.abs().max().item()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4 + 1e-5 * scale, msg=name)


def test_misused_image_and_text_inputs_are_named(model):
    pictures = images(2)
    with pytest.raises(TypeError, match="a uint8 tensor .* or a list of PIL images"):
        model.caption(pictures.numpy())
    with pytest.raises(UserError, match="embed_texts takes a non-empty list of texts"):
        model.embed_texts([])
    with pytest.raises(UserError, match="zero_shot needs a list of class prompts"):
        model.zero_shot(pictures, [])
    with pytest.raises(UserError, match="one list of the same number of classes for each of the 2 images"):
        model.zero_shot(pictures, [["a red circle", "a blue square"], ["a red circle"]])
    assert model.zero_shot(pictures, [["a red circle", "a blue square"]] * 2).shape == (2,)
