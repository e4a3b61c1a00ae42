"""CLIP: Hugging Face CLIPModel directories load into our CLIP with the same logits, our CLIP saves
directories CLIPModel loads, the loss is the symmetric InfoNCE, the temperature is clamped as
open_clip clamps it, and zero-shot classification picks the prompt CLIPModel ranks first."""

import math

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

from fromscratch.errors import UserError
from fromscratch.transformer.model import quick_gelu
from fromscratch.vlm import CLIP, CLIPConfig, TextTransformer, accelerate, contrastive_loss, zero_shot_classify
from fromscratch.vlm.clip import LOGIT_SCALE_MAX, clamp_logit_scale, eos_positions, l2_normalize

VOCAB = 99


def hf_clip(eos_token_id: int = VOCAB - 1, **text) -> transformers.CLIPModel:
    torch.manual_seed(0)
    text_config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, eos_token_id=eos_token_id, bos_token_id=VOCAB - 2, pad_token_id=0, **text)
    vision_config = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                                                  num_hidden_layers=2, num_attention_heads=4)
    config = transformers.CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                                     projection_dim=24)
    return transformers.CLIPModel(config).eval()


def texts(eos: int = VOCAB - 1):
    """Three right-padded texts ending in EOS at different places, and their attention mask."""
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB - 3, (3, 10))
    for row, end in enumerate((9, 6, 4)):
        ids[row, end] = eos
        ids[row, end + 1:] = 0
    return ids, (torch.arange(10)[None, :] <= torch.tensor([9, 6, 4])[:, None]).long()


@pytest.mark.parametrize("eos_token_id", [VOCAB - 1, 2], ids=["first-eos", "legacy-eos-2-argmax"])
def test_matches_hugging_face_clip_model(tmp_path, eos_token_id):
    reference = hf_clip(eos_token_id)
    reference.save_pretrained(tmp_path)
    ours = CLIP.from_pretrained(tmp_path)
    images = torch.randn(2, 3, 32, 32)
    ids, mask = texts(eos_token_id if eos_token_id != 2 else VOCAB - 1)  # legacy: the largest id ends the text
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=images, attention_mask=mask)
        logits = ours(images, ids, mask)
        assert logits.shape == (2, 3)
        torch.testing.assert_close(logits, expected.logits_per_image, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours.embed_images(images), expected.image_embeds, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.embed_texts(ids, mask), expected.text_embeds, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(images, ids), reference(input_ids=ids, pixel_values=images).logits_per_image,
                                   rtol=0, atol=1e-4)


@pytest.mark.parametrize("pad", ["zeros", "eos"])
def test_texts_padded_far_past_their_end_match_hugging_face(tmp_path, pad):
    """Texts padded to the model's 16 positions (OpenAI's clip.tokenize pads with zeros, the
    Hugging Face tokenizer with its end-of-text token): the text tower stops after the last end
    of text (`TextTransformer.states_at`), and the embeddings still equal CLIPModel's."""
    reference = hf_clip()
    reference.save_pretrained(tmp_path)
    ours = CLIP.from_pretrained(tmp_path)
    torch.manual_seed(4)
    ids = torch.randint(3, VOCAB - 3, (3, 16))
    ends = torch.tensor([5, 2, 7])  # the last at 7: nine of the sixteen columns are padding
    after_end = torch.arange(16)[None, :] > ends[:, None]
    ids[torch.arange(3), ends] = VOCAB - 1
    ids[after_end] = 0 if pad == "zeros" else VOCAB - 1
    mask = (~after_end).long()
    lengths = []  # of the sequence each text layer runs on
    ours.text.layers[0].register_forward_hook(lambda layer, args, out: lengths.append(out.size(1)))
    with torch.no_grad():
        for attention_mask in (None, mask):
            expected = reference.get_text_features(input_ids=ids, attention_mask=attention_mask).pooler_output
            torch.testing.assert_close(ours.embed_texts(ids, attention_mask), l2_normalize(expected),
                                       rtol=0, atol=1e-5)
    assert lengths == [8, 8]


def test_pooling_follows_hugging_face_eos_rule():
    ids = torch.tensor([[5, 7, 2, 9, 0], [5, 2, 0, 9, 9]])
    assert eos_positions(ids, 9).tolist() == [3, 3]  # the first eos
    assert eos_positions(ids, 2).tolist() == [3, 3]  # eos_id 2: the largest id (argmax), as HF's legacy configs
    assert eos_positions(torch.tensor([[4, 8, 9, 9, 0]]), 9).tolist() == [2]
    with pytest.raises(UserError, match="text 1 of the batch has no end-of-text token \\(id 9\\)"):
        eos_positions(torch.tensor([[4, 9, 0], [4, 8, 0]]), 9)  # CLIPModel would read row 1 at position 0


@pytest.mark.filterwarnings("ignore:var_mean")  # PyTorch's, for the plain LayerNorm of zero rows
def test_empty_batches_embed_to_empty_tensors():
    torch.manual_seed(5)
    config = CLIPConfig.from_preset("tiny", vocab_size=VOCAB, eos_id=VOCAB - 1)
    for model in (CLIP(config).eval(), accelerate(CLIP(config).eval())):
        images = torch.randn(2, 3, config.image_size, config.image_size)
        with torch.no_grad():
            assert model.embed_images(images[:0]).shape == (0, config.embed_dim)
            assert model.embed_texts(torch.zeros(0, 8, dtype=torch.long)).shape == (0, config.embed_dim)
            assert model(images, torch.zeros(0, 8, dtype=torch.long)).shape == (2, 0)


def test_the_text_tower_at_the_end_of_text_equals_its_full_output_there(tmp_path):
    """states_at (what embed_texts pools) runs the last layer at one position per row: equal to
    the full tower's output there, with or without padding, the position anywhere in the row."""
    hf_clip().save_pretrained(tmp_path)
    tower = CLIP.from_pretrained(tmp_path).text
    no_layers = TextTransformer(CLIP.from_pretrained(tmp_path).config.text_block_config(), n_layers=0)
    ids, mask = texts()
    rows = torch.arange(3)
    with torch.no_grad():
        for text in (tower, no_layers):
            for positions in (torch.tensor([9, 6, 4]), torch.tensor([0, 3, 9]), torch.tensor([2, 5, 1])):
                for attention_mask in (mask, None):
                    torch.testing.assert_close(text.states_at(ids, positions, attention_mask),
                                               text(ids, attention_mask)[rows, positions], rtol=1e-5, atol=1e-6)


def test_save_pretrained_writes_a_directory_clip_model_loads(tmp_path):
    torch.manual_seed(3)
    config = CLIPConfig.from_preset("tiny", vocab_size=VOCAB, eos_id=VOCAB - 1)
    ours = CLIP(config).eval()
    with torch.no_grad():
        ours.logit_scale.fill_(3.0)
    ours.save_pretrained(tmp_path / "clip")
    reference = transformers.CLIPModel.from_pretrained(tmp_path / "clip").eval()
    images = torch.randn(2, 3, 32, 32)
    ids, mask = texts()
    with torch.no_grad():
        torch.testing.assert_close(ours(images, ids, mask), reference(input_ids=ids, pixel_values=images,
                                                                     attention_mask=mask).logits_per_image,
                                   rtol=0, atol=1e-4)
    again = CLIP.from_pretrained(tmp_path / "clip")
    assert again.config == config
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


def test_int64_position_ids_buffers_are_skipped_and_other_integers_refused(tmp_path):
    reference = hf_clip()
    reference.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    buffers = {"text_model.embeddings.position_ids": torch.arange(16)[None],
               "vision_model.embeddings.position_ids": torch.arange(17)[None]}
    save_file({**weights, **buffers}, tmp_path / "model.safetensors")  # what older checkpoints hold
    images, (ids, mask) = torch.randn(1, 3, 32, 32), texts()
    with torch.no_grad():
        torch.testing.assert_close(CLIP.from_pretrained(tmp_path)(images, ids, mask),
                                   reference(input_ids=ids, pixel_values=images, attention_mask=mask).logits_per_image,
                                   rtol=0, atol=1e-4)
    weights["text_projection.weight"] = weights["text_projection.weight"].long()
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="'text_projection.weight' is int64, not floating point"):
        CLIP.from_pretrained(tmp_path)


def test_towers_with_different_activations_are_refused(tmp_path):
    hf_clip(hidden_act="gelu").save_pretrained(tmp_path)
    with pytest.raises(UserError, match="the towers differ"):
        CLIP.from_pretrained(tmp_path)


def test_contrastive_loss_is_symmetric_info_nce_as_hugging_face():
    torch.manual_seed(0)
    logits = torch.randn(5, 5) * 3
    torch.testing.assert_close(contrastive_loss(logits), image_text_contrastive_loss(logits.t()))
    # perfectly separated pairs: the loss goes to zero; all equal: log N
    assert contrastive_loss(torch.eye(4) * 100) < 1e-6
    assert contrastive_loss(torch.zeros(4, 4)).item() == pytest.approx(math.log(4))


def test_temperature_is_clamped_as_open_clip_does():
    clip = CLIP(CLIPConfig.from_preset("tiny"))
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        clip.logit_scale.fill_(7.0)
    clamp_logit_scale(clip.logit_scale)
    assert clip.logit_scale.item() == pytest.approx(LOGIT_SCALE_MAX) and math.exp(LOGIT_SCALE_MAX) == pytest.approx(100)
    with torch.no_grad():
        clip.logit_scale.fill_(-1.0)
    clamp_logit_scale(clip.logit_scale)
    assert clip.logit_scale.item() == 0.0


def test_zero_shot_picks_the_prompt_clip_model_ranks_first(tmp_path):
    reference = hf_clip()
    reference.save_pretrained(tmp_path)
    ours = CLIP.from_pretrained(tmp_path)
    images = torch.randn(6, 3, 32, 32)
    prompts, mask = texts()  # three "class prompts"
    with torch.no_grad():
        expected = reference(input_ids=prompts, pixel_values=images, attention_mask=mask).logits_per_image.argmax(1)
        predicted = zero_shot_classify(ours.embed_images(images), ours.embed_texts(prompts, mask))
        assert torch.equal(predicted, expected)
        per_image = ours.embed_texts(prompts, mask)[None].expand(6, -1, -1)  # prompts of each image's own
        assert torch.equal(zero_shot_classify(ours.embed_images(images), per_image), expected)


def test_quick_gelu_is_clips_activation():
    x = torch.linspace(-4, 4, 9)
    from transformers.activations import QuickGELUActivation

    torch.testing.assert_close(quick_gelu(x), QuickGELUActivation()(x))


def test_the_tiny_preset_pools_at_its_end_of_text_token_not_at_the_largest_id():
    """Its eos_id is not 2, the id that takes Hugging Face's legacy rule: two texts that differ
    before their end-of-text token get different embeddings even when a larger id comes first."""
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig.from_preset("tiny")).eval()
    eos = clip.config.eos_id
    with torch.no_grad():
        a, b = clip.embed_texts(torch.tensor([[900, 5, 6, eos], [900, 7, 8, eos]]))
    assert not torch.allclose(a, b)
