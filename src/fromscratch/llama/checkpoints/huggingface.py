"""Hugging Face Llama directories (`LlamaForCausalLM`): read them, write them.

Reading: `config.json` + the weights in any of Hugging Face's layouts (single or sharded
safetensors or `.bin`, read by `fromscratch.checkpoints.huggingface`), keys renamed to Meta's.
Writing: `config.json` + `model.safetensors` (+ the tokenizer), all at once or not at all.

The one piece of maths here is RoPE's layout. Meta rotates *adjacent* pairs of a head's
features, (x₀, x₁), (x₂, x₃), ...; Hugging Face's `rotate_half` rotates feature i with
feature i + head_dim/2. Both compute the same attention if the rows of wq and wk are reordered
so that pair i's two rows land at positions i and i + head_dim/2 of each head: that is
`meta_to_hf_permute`, and `hf_to_meta_permute` undoes it. wv, wo and the MLP need nothing.
"""

import json
import re
import shutil
from pathlib import Path

import torch

from fromscratch.checkpoints.huggingface import read_weights, write_model_directory
from fromscratch.checkpoints.safe import read_json_object, save_safetensors
from fromscratch.config import json_field
from fromscratch.errors import UserError
from fromscratch.llama.checkpoints.common import Checkpoint, cast, expected_shapes, make_config
from fromscratch.llama.config import LlamaConfig

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
# Files that travel with a Hugging Face tokenizer and are copied along with it.
TOKENIZER_SIDECARS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

# --- RoPE layout: Meta's adjacent pairs <-> Hugging Face's rotate_half halves -----------------


def meta_to_hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a Meta wq/wk (n_heads·head_dim, d_in) for Hugging Face's RoPE.

    Within each head, Meta's row 2i + j (pair i, j = 0 real / 1 imaginary part) moves to row
    j·head_dim/2 + i. Pass n_kv_heads for wk.
    """
    rows, d_in = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, d_in).transpose(1, 2).reshape(rows, d_in)


def hf_to_meta_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `meta_to_hf_permute`: Hugging Face q_proj/k_proj rows back to Meta's order."""
    rows, d_in = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, d_in).transpose(1, 2).reshape(rows, d_in)


def hf_to_meta_layout(name: str, tensor: torch.Tensor, config: LlamaConfig) -> torch.Tensor:
    """A Hugging Face tensor, already under its Meta `name`, in Meta's layout: wq/wk rows back to
    adjacent RoPE pairs; every other tensor as it is."""
    if name.endswith("attention.wq.weight"):
        return hf_to_meta_permute(tensor, config.n_heads)
    if name.endswith("attention.wk.weight"):
        return hf_to_meta_permute(tensor, config.kv_heads)
    return tensor


# --- key names and config.json ----------------------------------------------------------------

_HF_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}
_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def hf_key_to_meta(key: str) -> str | None:
    """`model.layers.3.mlp.gate_proj.weight` -> `layers.3.feed_forward.w1.weight`; None if not Llama's."""
    if key in _HF_TOP:
        return _HF_TOP[key]
    m = _HF_LAYER_KEY.fullmatch(key)
    if m and m.group(2) in _HF_LAYER:
        return f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}.weight"
    return None


def meta_key_to_hf(key: str) -> str:
    for hf, meta in _HF_TOP.items():
        if key == meta:
            return hf
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", key)
    for hf, meta in _HF_LAYER.items():
        if m and m.group(2) == meta:
            return f"model.layers.{m.group(1)}.{hf}.weight"
    return key


def config_from_hf(hf: dict, source: str, model_type: str = "llama") -> dict:
    """The LlamaConfig fields of a Hugging Face `model_type` config.json (transformers 4.x or 5.x),
    each checked for its type under the name the file gives it."""
    found_type = hf.get("model_type", model_type)
    if found_type != model_type:
        raise UserError(f"{source}: model_type is {found_type!r}; this loader reads {model_type!r} checkpoints")
    if json_field(hf, "hidden_act", str, source, "silu") != "silu":
        raise UserError(f"{source}: hidden_act {hf['hidden_act']!r} is not Llama's SiLU (SwiGLU)")
    if json_field(hf, "attention_bias", bool, source, False) or json_field(hf, "mlp_bias", bool, source, False):
        raise UserError(f"{source}: attention_bias/mlp_bias are set; Llama's projections have no biases")
    hidden_size = json_field(hf, "hidden_size", int, source)
    n_heads = json_field(hf, "num_attention_heads", int, source)
    if json_field(hf, "head_dim", int | None, source, None) not in (None, hidden_size // max(n_heads, 1)):
        raise UserError(f"{source}: head_dim {hf['head_dim']} ≠ hidden_size / num_attention_heads, as our Llama assumes")
    # transformers 5 keeps RoPE settings in rope_parameters; 4.x in rope_theta + rope_scaling.
    rope = json_field(hf, "rope_parameters", dict | None, source, None) or {}
    scaling = json_field(hf, "rope_scaling", dict | None, source, None) or {}
    # Either key may ask for scaling (transformers applies a rope_scaling beside a default
    # rope_parameters), so neither may hide the other's.
    for key, settings in (("rope_parameters", rope), ("rope_scaling", scaling)):
        rope_type = settings.get("rope_type", settings.get("type", "default"))
        if rope_type != "default":
            raise UserError(f"{source}: {key} asks for RoPE scaling {rope_type!r}, which is not implemented here "
                            "(plain RoPE only)")
    return dict(
        vocab_size=json_field(hf, "vocab_size", int, source),
        d_model=hidden_size,
        n_layers=json_field(hf, "num_hidden_layers", int, source),
        n_heads=n_heads,
        n_kv_heads=json_field(hf, "num_key_value_heads", int | None, source, None),
        ffn_hidden_dim=json_field(hf, "intermediate_size", int, source),
        norm_eps=json_field(hf, "rms_norm_eps", float, source, 1e-6),
        rope_theta=json_field(rope, "rope_theta", float, source, json_field(hf, "rope_theta", float, source, 10000.0)),
        max_seq_len=json_field(hf, "max_position_embeddings", int, source, 2048),
        tie_embeddings=json_field(hf, "tie_word_embeddings", bool, source, False),
    )


def config_to_hf(config: LlamaConfig) -> dict:
    """A config.json that transformers' LlamaForCausalLM reads as this exact model."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},  # 5.x
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }


def read_hf(directory: Path, dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    config_path = directory / "config.json"
    config = make_config(str(config_path), **config_from_hf(read_json_object(config_path), str(config_path)))
    shapes = expected_shapes(config)
    sd, origin = {}, {}
    # rotary_emb.inv_freq: a constant older transformers versions saved; recomputed by the model.
    for key, tensor, where in read_weights(directory, skip=lambda key: key.endswith("rotary_emb.inv_freq")):
        name = hf_key_to_meta(key) or key
        if tuple(tensor.shape) == shapes.get(name):  # a wrong shape is reported by check()
            tensor = hf_to_meta_layout(name, tensor, config)
        sd[name], origin[name] = tensor, where
    return Checkpoint(directory, "huggingface", config, str(config_path), cast(sd, dtype), origin,
                      stored_as=meta_key_to_hf)


# --- tokenizers -------------------------------------------------------------------------------


def find_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer.model / tokenizer.json that belongs with the checkpoint at `path`, if any.

    Looked for in the checkpoint's directory (the file's directory for a file), then for a
    training checkpoint in its run directory, and for a Meta directory one level up (Meta's
    downloads keep tokenizer.model beside the llama-2-7b/ ... directories).
    """
    path = Path(path)
    start = path if path.is_dir() else path.parent
    places = [start]
    if start.parent.name == "checkpoints":
        places.append(start.parent.parent)
    if (start / "params.json").exists():
        places.append(start.parent)
    for place in places:
        for name in TOKENIZER_FILES:
            if (place / name).is_file():
                return place / name
    return None


def _copy_tokenizer(tokenizer_path: Path, out_dir: Path) -> None:
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise UserError(f"tokenizer {tokenizer_path} does not exist")
    standard = {".model": "tokenizer.model", ".json": "tokenizer.json"}
    name = standard.get(tokenizer_path.suffix, tokenizer_path.name)
    shutil.copy2(tokenizer_path, out_dir / name)
    for sidecar in TOKENIZER_SIDECARS:
        if (tokenizer_path.parent / sidecar).is_file():
            shutil.copy2(tokenizer_path.parent / sidecar, out_dir / sidecar)


def _special_token_ids(tokenizer_path: Path | None) -> dict:
    """bos/eos ids for config.json, from a SentencePiece model (tokenizer.json: left to HF)."""
    if tokenizer_path is None or Path(tokenizer_path).suffix != ".model":
        return {}
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    except (RuntimeError, OSError) as e:
        raise UserError(f"{tokenizer_path}: not a SentencePiece model ({e})") from None
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


# --- writing Hugging Face directories ---------------------------------------------------------


def hf_tensors(config: LlamaConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (Meta-named) weights under Hugging Face's names, q/k rows permuted for its RoPE."""
    tensors, weights = {}, expected_shapes(config)  # (a tied output.weight is not among them)
    for name, tensor in state_dict.items():
        if name not in weights:
            continue
        t = tensor.detach().cpu()
        if name.endswith("attention.wq.weight"):
            t = meta_to_hf_permute(t, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = meta_to_hf_permute(t, config.kv_heads)
        tensors[meta_key_to_hf(name)] = t.contiguous().clone()
    return tensors


def write_hf_files(out: Path, hf_config: dict, tensors: dict[str, torch.Tensor],
                   tokenizer_path: Path | None) -> None:
    """config.json (with the weights' dtype and the tokenizer's special ids), model.safetensors
    and the tokenizer, into the directory `out`."""
    if tokenizer_path is not None:  # one with more tokens than the model would fail only when generating
        from fromscratch.llama.tokenizer import Tokenizer

        size = Tokenizer(tokenizer_path).vocab_size
        if size > hf_config["vocab_size"]:
            raise UserError(f"the tokenizer {tokenizer_path} has {size} tokens but the model "
                            f"{hf_config['vocab_size']}: they do not belong together")
    dtypes = {t.dtype for t in tensors.values()}
    hf_config["torch_dtype"] = str(dtypes.pop() if len(dtypes) == 1 else torch.float32).removeprefix("torch.")
    hf_config.update(_special_token_ids(tokenizer_path))
    save_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer_path is not None:
        _copy_tokenizer(Path(tokenizer_path), out)


def write_hf(config: LlamaConfig, state_dict: dict[str, torch.Tensor], out_dir: str | Path,
             tokenizer_path: str | Path | None = None) -> Path:
    """Write a Hugging Face Llama directory, all at once or not at all
    (`fromscratch.checkpoints.huggingface.write_model_directory`)."""
    tensors = hf_tensors(config, state_dict)
    return write_model_directory(out_dir, lambda tmp: write_hf_files(tmp, config_to_hf(config), tensors, tokenizer_path))
