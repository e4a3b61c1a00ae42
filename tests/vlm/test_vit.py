"""The Vision Transformer: patchify is a strided convolution, the position grid is resized as
Hugging Face resizes it, and a Hugging Face ViT directory loads into our ViT with the same outputs."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from fromscratch.errors import UserError
from fromscratch.transformer.model import EncoderLayer
from fromscratch.vlm import ViT, ViTConfig, patchify
from fromscratch.vlm.vit import resize_position_grid

HF_SMALL = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=96)


def save_hf_vit(directory, model_class=transformers.ViTModel, **overrides):
    torch.manual_seed(0)
    model = model_class(transformers.ViTConfig(**{**HF_SMALL, **overrides})).eval()
    model.save_pretrained(directory)
    return model


def test_patchify_and_linear_is_a_strided_convolution():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, kernel_size=4, stride=4)
    images = torch.randn(2, 3, 12, 16)
    expected = conv(images).flatten(2).transpose(1, 2)  # (B, N, D), patches row-major
    ours = patchify(images, 4) @ conv.weight.reshape(16, -1).t() + conv.bias
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert patchify(images, 4).shape == (2, 3 * 4, 3 * 4 * 4)
    # patch k is the k-th 4×4 block in row-major order, flattened channel, row, column
    assert torch.equal(patchify(images, 4)[1, 5], images[1, :, 4:8, 4:8].reshape(-1))


def test_vit_blocks_are_the_transformers_pre_norm_gelu_encoder_layers():
    vit = ViT(ViTConfig(image_size=16, patch_size=8, d_model=32, n_layers=2, n_heads=4, d_ff=64))
    assert all(type(layer) is EncoderLayer for layer in vit.layers)
    block = vit.config.block_config()
    assert block.norm_first and block.activation == "gelu" and block.norm_eps == 1e-12
    assert vit(torch.randn(3, 3, 16, 16)).shape == (3, 1 + 4, 32)


def test_matches_hugging_face_vit_model(tmp_path):
    reference = save_hf_vit(tmp_path)
    ours = ViT.from_pretrained(tmp_path)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference(images).last_hidden_state
        torch.testing.assert_close(ours(images), expected, rtol=0, atol=1e-4)
    assert (ours(images) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("n_layers", [1, 3])
def test_class_state_is_the_class_tokens_final_state_and_trains_alike(n_layers):
    """class_state runs the last layer for the class token only: the same (B, D) as
    forward()[:, 0], and the same gradients for a classifier's loss on it."""
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=16, patch_size=4, d_model=32, n_layers=n_layers, n_heads=4, d_ff=64,
                        pre_norm=True))
    images = torch.randn(3, 3, 16, 16)
    full, pooled = vit(images)[:, 0], vit.class_state(images)
    torch.testing.assert_close(pooled, full, rtol=1e-5, atol=1e-6)
    labels = torch.tensor([0, 3, 1])
    grads = [torch.autograd.grad(F.cross_entropy(y[:, :8], labels), list(vit.parameters()), allow_unused=True)
             for y in (vit(images)[:, 0], vit.class_state(images))]
    for g_full, g_pooled in zip(*grads):
        if g_full is None:
            assert g_pooled is None
        else:
            torch.testing.assert_close(g_pooled, g_full, rtol=1e-4, atol=1e-6)


def test_other_image_sizes_interpolate_the_positions_as_hugging_face_does(tmp_path):
    reference = save_hf_vit(tmp_path)
    ours = ViT.from_pretrained(tmp_path)
    for shape in [(48, 48), (40, 24)]:
        images = torch.randn(2, 3, *shape)
        with torch.no_grad():
            expected = reference(images, interpolate_pos_encoding=True).last_hidden_state
            assert ours(images).shape == (2, 1 + (shape[0] // 8) * (shape[1] // 8), 48)
            torch.testing.assert_close(ours(images), expected, rtol=0, atol=1e-4)
    # resizing a grid to its own size leaves it as it is
    grid = torch.randn(16, 5)
    torch.testing.assert_close(resize_position_grid(grid, (4, 4)), grid)


def test_image_classification_checkpoint_and_no_qkv_bias(tmp_path):
    """ViTForImageClassification keeps the encoder under vit. and adds a classifier (left aside);
    qkv_bias=false has no q/k/v biases, read as zeros."""
    reference = save_hf_vit(tmp_path, transformers.ViTForImageClassification, qkv_bias=False, num_labels=5)
    ours = ViT.from_pretrained(tmp_path)
    assert torch.equal(ours.layers[0].self_attention.q_proj.bias, torch.zeros(48))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.vit(images).last_hidden_state
        torch.testing.assert_close(ours(images), expected, rtol=0, atol=1e-4)


def test_bad_checkpoints_are_refused_naming_the_problem(tmp_path):
    save_hf_vit(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "relu6"}))
    with pytest.raises(UserError, match="hidden_act 'relu6'"):
        ViT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "clip"}))
    with pytest.raises(UserError, match="model_type is 'clip'"):
        ViT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(UserError, match="has shape .* but its model config implies"):
        ViT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "layernorm.weight"}, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="missing tensor 'norm.weight'"):
        ViT.from_pretrained(tmp_path)
    save_file({**weights, "extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="'extra.weight': not a tensor of a ViT"):
        ViT.from_pretrained(tmp_path)
    with pytest.raises(UserError, match="no config.json"):
        ViT.from_pretrained(tmp_path / "nowhere")


def test_config_checks_and_presets():
    with pytest.raises(UserError, match="multiple of patch_size"):
        ViTConfig(image_size=30, patch_size=8)
    with pytest.raises(UserError, match="divisible by n_heads"):
        ViTConfig(d_model=30, n_heads=4)
    tiny = ViTConfig.from_preset("tiny", image_size=32, patch_size=4)  # the benchmark's ViT-Tiny
    assert (tiny.d_model, tiny.n_layers, tiny.n_heads, tiny.n_patches) == (192, 12, 3, 64)
    with pytest.raises(UserError, match="3-channel images"):
        ViT(ViTConfig(image_size=16, patch_size=8, d_model=8, n_layers=1, n_heads=2, d_ff=8))(torch.zeros(1, 1, 16, 16))


def test_gelu_is_exact_not_tanh():
    x = torch.linspace(-3, 3, 7)
    vit = ViT(ViTConfig(image_size=8, patch_size=8, d_model=8, n_layers=1, n_heads=2, d_ff=8))
    torch.testing.assert_close(vit.layers[0].feed_forward.activation(x), F.gelu(x))
