"""Hugging Face ViT and CLIP directories: read them into our ViT / CLIP, write CLIP back.

A directory holds `config.json` and the weights in any of Hugging Face's layouts (read by
`fromscratch.checkpoints.huggingface`). Key names are those of the files on the hub and of
`save_pretrained` (`encoder.layer.0.attention.attention.query.weight`, ...), which transformers
5 still writes. What is mapped beyond renaming:

    ViT    patch_embeddings.projection (D, C, P, P) Conv2d kernel → our Linear (D, C·P·P);
           cls_token (1, 1, D) → (D,); position_embeddings (1, 1 + N, D) → (1 + N, D);
           qkv_bias=false → zero biases (the same function); pooler and classifier are left out
    CLIP   the same for the image tower (its patch projection has no bias); nn.Embedding
           position tables → our parameters of the same shape; int64 `position_ids` buffers,
           which older files hold, are skipped before the float check

The state is checked strictly before any tensor is copied (a missing, unexpected or mis-shaped
tensor is a UserError naming it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from fromscratch.checkpoints.huggingface import read_weights, write_model_directory
from fromscratch.checkpoints.safe import read_json_object, save_safetensors
from fromscratch.config import json_field
from fromscratch.devices import resolve_device
from fromscratch.errors import UserError
from fromscratch.transformer.checkpoints import check_state_dict
from fromscratch.vlm.vit import ViTConfig

ACTIVATIONS = ("gelu", "quick_gelu")  # the hidden_act values our FeedForward computes exactly

# One encoder layer: Hugging Face's ViT names, CLIP's names → ours (EncoderLayer).
VIT_LAYER = {
    "attention.attention.query": "self_attention.q_proj",
    "attention.attention.key": "self_attention.k_proj",
    "attention.attention.value": "self_attention.v_proj",
    "attention.output.dense": "self_attention.out_proj",
    "intermediate.dense": "feed_forward.w_1",
    "output.dense": "feed_forward.w_2",
    "layernorm_before": "norms.0",
    "layernorm_after": "norms.1",
}
CLIP_LAYER = {
    "self_attn.q_proj": "self_attention.q_proj",
    "self_attn.k_proj": "self_attention.k_proj",
    "self_attn.v_proj": "self_attention.v_proj",
    "self_attn.out_proj": "self_attention.out_proj",
    "mlp.fc1": "feed_forward.w_1",
    "mlp.fc2": "feed_forward.w_2",
    "layer_norm1": "norms.0",
    "layer_norm2": "norms.1",
}
VIT_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "position_embedding",
    "embeddings.patch_embeddings.projection.weight": "patch_embedding.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embedding.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
CLIP_TOP = {
    "logit_scale": "logit_scale",
    "visual_projection.weight": "image_projection.weight",
    "text_projection.weight": "text_projection.weight",
    "vision_model.embeddings.class_embedding": "vision.cls_token",
    "vision_model.embeddings.patch_embedding.weight": "vision.patch_embedding.weight",
    "vision_model.embeddings.position_embedding.weight": "vision.position_embedding",
    "vision_model.pre_layrnorm.weight": "vision.pre_norm.weight",  # sic: Hugging Face's spelling
    "vision_model.pre_layrnorm.bias": "vision.pre_norm.bias",
    "vision_model.post_layernorm.weight": "vision.norm.weight",
    "vision_model.post_layernorm.bias": "vision.norm.bias",
    "text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "text.position_embedding",
    "text_model.final_layer_norm.weight": "text.norm.weight",
    "text_model.final_layer_norm.bias": "text.norm.bias",
}
VIT_IGNORED = re.compile(r"(pooler|classifier)\..*|embeddings\.mask_token")  # heads we do not build
_LAYER_KEY = re.compile(r"(.*)\.(\d+)\.(.+)\.(weight|bias)")


def _rename(key: str, top: dict[str, str], layers: dict[str, tuple[str, dict[str, str]]]) -> str | None:
    """Our name of a Hugging Face key: `top` for single tensors; `layers` maps a layer-list prefix
    (`encoder.layer`) to (our prefix, the per-layer table). None: not ours."""
    if key in top:
        return top[key]
    match = _LAYER_KEY.fullmatch(key)
    if match and match[1] in layers:
        prefix, table = layers[match[1]]
        if match[3] in table:
            return f"{prefix}{match[2]}.{table[match[3]]}.{match[4]}"
    return None


def build_checked(cls, config, state: dict[str, torch.Tensor], source: str, device: str):
    """A `cls(config)` holding `state`, checked tensor by tensor first, in eval mode on `device`."""
    with torch.device("meta"):
        model = cls(config)
    check_state_dict(model, state, source)
    model.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=True, assign=True)
    return model.to(resolve_device(device)).eval()


def _read_config(directory: Path, model_type: str) -> tuple[dict, str]:
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory}: no config.json (not a Hugging Face model directory)")
    hf = read_json_object(path)
    found = hf.get("model_type")
    if found != model_type:
        raise UserError(f"{path}: model_type is {found!r}; this loader reads {model_type!r} checkpoints")
    return hf, str(path)


def _activation(hf: dict, source: str) -> str:
    act = json_field(hf, "hidden_act", str, source, "gelu")
    if act not in ACTIVATIONS:
        raise UserError(f"{source}: hidden_act {act!r} is not one of {', '.join(ACTIVATIONS)}")
    return act


# --- ViT ------------------------------------------------------------------------------------------


def encoder_shape(hf: dict, source: str, prefix: str, d_model: int, n_layers: int, n_heads: int,
                  d_ff: int) -> dict:
    """A Hugging Face encoder's shape (hidden_size, num_hidden_layers, num_attention_heads,
    intermediate_size) as our `{prefix}d_model`, `{prefix}n_layers`, … with Hugging Face's defaults given."""
    return {f"{prefix}d_model": json_field(hf, "hidden_size", int, source, d_model),
            f"{prefix}n_layers": json_field(hf, "num_hidden_layers", int, source, n_layers),
            f"{prefix}n_heads": json_field(hf, "num_attention_heads", int, source, n_heads),
            f"{prefix}d_ff": json_field(hf, "intermediate_size", int, source, d_ff)}


def image_fields(hf: dict, source: str, patch_size: int) -> dict:
    """A Hugging Face vision config's image_size, patch_size (default given) and num_channels."""
    return dict(image_size=json_field(hf, "image_size", int, source, 224),
                patch_size=json_field(hf, "patch_size", int, source, patch_size),
                n_channels=json_field(hf, "num_channels", int, source, 3))


def vit_config_from_hf(hf: dict, source: str) -> ViTConfig:
    """Our ViTConfig of a Hugging Face ViT config.json, each key checked under its own name."""
    values = dict(
        **image_fields(hf, source, patch_size=16),
        **encoder_shape(hf, source, "", d_model=768, n_layers=12, n_heads=12, d_ff=3072),
        dropout=json_field(hf, "hidden_dropout_prob", float, source, 0.0),
        norm_eps=json_field(hf, "layer_norm_eps", float, source, 1e-12),
        activation=_activation(hf, source),
    )
    return ViTConfig.from_dict(values, source)


def read_vit(directory) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """(config, state dict in our names) of a Hugging Face ViT directory."""
    directory = Path(directory)
    hf, source = _read_config(directory, "vit")
    config = vit_config_from_hf(hf, source)
    state = {}
    for key, tensor, origin in read_weights(directory):
        key = key.removeprefix("vit.")  # ViTForImageClassification keeps the encoder under vit.
        if VIT_IGNORED.fullmatch(key):
            continue
        name = _rename(key, VIT_TOP, {"encoder.layer": ("layers.", VIT_LAYER)})
        if name is None:
            raise UserError(f"{origin}: not a tensor of a ViT")
        if name == "patch_embedding.weight":
            tensor = tensor.reshape(tensor.size(0), -1)  # (D, C, P, P) kernel → (D, C·P·P)
        elif name == "cls_token":
            tensor = tensor.reshape(-1)
        elif name == "position_embedding":
            tensor = tensor.reshape(-1, tensor.size(-1))
        state[name] = tensor
    if not json_field(hf, "qkv_bias", bool, source, True):  # no bias is a zero bias
        for i in range(config.n_layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                state.setdefault(f"layers.{i}.self_attention.{proj}.bias", torch.zeros(config.d_model))
    return config, state


def load_vit(cls, directory, device: str = "cpu"):
    config, state = read_vit(directory)
    return build_checked(cls, config, state, str(directory), device)


# --- CLIP -----------------------------------------------------------------------------------------

CLIP_LAYERS = {"vision_model.encoder.layers": ("vision.layers.", CLIP_LAYER),
               "text_model.encoder.layers": ("text.layers.", CLIP_LAYER)}


def clip_config_from_hf(hf: dict, source: str):
    """Our CLIPConfig of a Hugging Face CLIP config.json (defaults: Hugging Face's)."""
    from fromscratch.vlm.clip import CLIPConfig

    text = json_field(hf, "text_config", dict | None, source, None) or {}
    vision = json_field(hf, "vision_config", dict | None, source, None) or {}
    text_source, vision_source = f"{source} text_config", f"{source} vision_config"
    acts = {_activation({"hidden_act": "quick_gelu", **text}, text_source),
            _activation({"hidden_act": "quick_gelu", **vision}, vision_source)}
    eps = {json_field(text, "layer_norm_eps", float, text_source, 1e-5),
           json_field(vision, "layer_norm_eps", float, vision_source, 1e-5)}
    if len(acts) > 1 or len(eps) > 1:
        raise UserError(f"{source}: the towers differ in hidden_act or layer_norm_eps; this CLIP shares them")
    values = dict(
        embed_dim=json_field(hf, "projection_dim", int, source, 512),
        logit_scale_init=json_field(hf, "logit_scale_init_value", float, source, 2.6592),
        **image_fields(vision, vision_source, patch_size=32),
        **encoder_shape(vision, vision_source, "vision_", d_model=768, n_layers=12, n_heads=12, d_ff=3072),
        vocab_size=json_field(text, "vocab_size", int, text_source, 49408),
        max_text_len=json_field(text, "max_position_embeddings", int, text_source, 77),
        **encoder_shape(text, text_source, "text_", d_model=512, n_layers=12, n_heads=8, d_ff=2048),
        eos_id=json_field(text, "eos_token_id", int, text_source, 49407),
        activation=acts.pop(),
        norm_eps=eps.pop(),
    )
    return CLIPConfig.from_dict(values, source)


def read_clip(directory):
    """(CLIPConfig, state dict in our names) of a Hugging Face CLIP directory."""
    directory = Path(directory)
    hf, source = _read_config(directory, "clip")
    config = clip_config_from_hf(hf, source)
    state = {}
    # position_ids: int64 arange buffers older files hold; not weights
    for key, tensor, origin in read_weights(directory, skip=lambda k: k.endswith("position_ids")):
        name = _rename(key, CLIP_TOP, CLIP_LAYERS)
        if name is None:
            raise UserError(f"{origin}: not a tensor of a CLIPModel")
        if name == "vision.patch_embedding.weight":
            tensor = tensor.reshape(tensor.size(0), -1)
        state[name] = tensor
    return config, state


def load_clip(cls, directory, device: str = "cpu"):
    config, state = read_clip(directory)
    return build_checked(cls, config, state, str(directory), device)


def clip_config_to_hf(config) -> dict:
    """A config.json that transformers' CLIPModel reads as this exact model."""
    shared = {"hidden_act": config.activation, "layer_norm_eps": config.norm_eps, "attention_dropout": 0.0}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.logit_scale_init,
        "text_config": {
            "model_type": "clip_text_model", **shared, "vocab_size": config.vocab_size,
            "hidden_size": config.text_d_model, "intermediate_size": config.text_d_ff,
            "num_hidden_layers": config.text_n_layers, "num_attention_heads": config.text_n_heads,
            "max_position_embeddings": config.max_text_len, "eos_token_id": config.eos_id,
            "bos_token_id": 0, "pad_token_id": 0, "projection_dim": config.embed_dim,
        },
        "vision_config": {
            "model_type": "clip_vision_model", **shared, "image_size": config.image_size,
            "patch_size": config.patch_size, "num_channels": config.n_channels,
            "hidden_size": config.vision_d_model, "intermediate_size": config.vision_d_ff,
            "num_hidden_layers": config.vision_n_layers, "num_attention_heads": config.vision_n_heads,
            "projection_dim": config.embed_dim,
        },
    }


def save_clip(model, out_dir) -> Path:
    """Write config.json + model.safetensors in Hugging Face's names, all at once or not at all."""
    config = model.config
    ours_to_hf = {ours: hf for hf, ours in CLIP_TOP.items()}
    for hf_prefix, (our_prefix, table) in CLIP_LAYERS.items():
        for i in range(config.vision_n_layers if our_prefix.startswith("vision") else config.text_n_layers):
            for hf_name, our_name in table.items():
                for kind in ("weight", "bias"):
                    ours_to_hf[f"{our_prefix}{i}.{our_name}.{kind}"] = f"{hf_prefix}.{i}.{hf_name}.{kind}"
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().float().cpu()
        if name == "vision.patch_embedding.weight":
            p = config.patch_size
            tensor = tensor.reshape(tensor.size(0), config.n_channels, p, p)  # back to a Conv2d kernel
        state[ours_to_hf[name]] = tensor

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(clip_config_to_hf(config), indent=2) + "\n")
        save_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})

    return write_model_directory(out_dir, write)
