"""Llama checkpoints in every format people actually have: read them all, write Hugging Face's.

`load_pretrained(path)` recognises, by what is on disk:

    Hugging Face directory   config.json + model.safetensors | model-0000i-of-0000n.safetensors
                             (+ .index.json) | pytorch_model.bin | pytorch_model-0000i-of-0000n.bin
    Meta directory           params.json + consolidated.00.pth ... (model-parallel shards, merged)
    llama2.c .bin            version 0 (bare 7-int header), 1 (float32) or 2 (int8 "Q8_0") files
    llama2.c training .pt    {"model_args": ..., "model": state_dict} written by its train.py
    our training runs        RUN_DIR (its latest checkpoint) or RUN_DIR/checkpoints/step-N

Every reader produces the same thing, a `LlamaConfig` and a state dict in Meta's key names
(`layers.0.attention.wq.weight`, ...), which `model.py` uses too. One function then checks it
strictly (no tensor missing, none extra, every shape as the config says) and builds the model.

The one piece of maths here is RoPE's layout. Meta rotates *adjacent* pairs of a head's
features, (x₀, x₁), (x₂, x₃), ...; Hugging Face's `rotate_half` rotates feature i with
feature i + head_dim/2. Both compute the same attention if the rows of wq and wk are reordered
so that pair i's two rows land at positions i and i + head_dim/2 of each head: that is
`meta_to_hf_permute`, and `hf_to_meta_permute` undoes it. wv, wo and the MLP need nothing.

Pickled files (`.pth`, `.bin`, `.pt`) are opened only with `torch.load(weights_only=True)`,
which refuses any pickle that would import or call code.
"""

import json
import math
import os
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fromscratch.engine.checkpoint import INDEX, MODEL_CONFIG, MODEL_FILE, load_model_weights, read_index
from fromscratch.errors import UserError
from fromscratch.llama.model import Llama, LlamaConfig

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


# --- what a checkpoint must hold --------------------------------------------------------------


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama checkpoint (Meta's names) and the shape `config` gives it."""
    d, hd, ffn = config.d_model, config.head_dim, config.hidden_dim
    shapes = {"tok_embeddings.weight": (config.vocab_size, d)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (d,)
        shapes[p + "attention.wq.weight"] = (config.n_heads * hd, d)
        shapes[p + "attention.wk.weight"] = (config.kv_heads * hd, d)
        shapes[p + "attention.wv.weight"] = (config.kv_heads * hd, d)
        shapes[p + "attention.wo.weight"] = (d, config.n_heads * hd)
        shapes[p + "ffn_norm.weight"] = (d,)
        shapes[p + "feed_forward.w1.weight"] = (ffn, d)
        shapes[p + "feed_forward.w2.weight"] = (d, ffn)
        shapes[p + "feed_forward.w3.weight"] = (ffn, d)
    shapes["norm.weight"] = (d,)
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.vocab_size, d)
    return shapes


@dataclass
class Checkpoint:
    """A checkpoint read from disk, before it becomes a model.

    state_dict uses Meta's names; `origin[name]` says where a tensor came from ("file: key in
    file") and `stored_as(name)` what a missing one would have been called, for error messages.
    """

    path: Path
    format: str
    config: LlamaConfig
    config_source: str
    state_dict: dict[str, torch.Tensor]
    origin: dict[str, str] = field(default_factory=dict)
    stored_as: Callable[[str], str] = lambda name: name

    def check(self) -> None:
        """Strict load semantics: every expected tensor present with its shape, nothing extra."""
        sd, tied = self.state_dict, self.config.tie_embeddings
        if tied and "output.weight" in sd:
            # Some writers store the tied matrix under both names, or only under the output's.
            out = sd.pop("output.weight")
            if "tok_embeddings.weight" not in sd:
                sd["tok_embeddings.weight"] = out
                self.origin["tok_embeddings.weight"] = self.origin.get("output.weight", "")
            elif not torch.equal(out, sd["tok_embeddings.weight"]):
                raise UserError(
                    f"{self.where('output.weight')}: the config ({self.config_source}) ties the output "
                    "layer to the embedding, but the checkpoint holds a different output matrix"
                )
        expected = expected_shapes(self.config)
        for name, shape in expected.items():
            if name not in sd:
                raise UserError(
                    f"{self.path}: missing tensor {self.stored_as(name)!r} "
                    f"(expected shape {shape} from {self.config_source})"
                )
            if tuple(sd[name].shape) != shape:
                raise UserError(
                    f"{self.where(name)}: shape {tuple(sd[name].shape)} disagrees with "
                    f"{self.config_source}, which implies {shape}"
                )
        extra = [name for name in sd if name not in expected]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise UserError(f"{self.where(extra[0])}: unexpected tensor{more} for a Llama checkpoint")

    def where(self, name: str) -> str:
        return self.origin.get(name) or f"{self.path}: tensor {name!r}"


# --- safe file readers ------------------------------------------------------------------------


def _is_torch_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _torch_load(path: Path) -> dict:
    """Unpickle with `weights_only=True`: tensors and plain containers only, never code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # UnpicklingError, RuntimeError (corrupt zip), EOFError (truncated), ...
        # torch's message opens with advice to retry with weights_only=False; keep only the cause.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        cause = next((line for line in lines if not line.startswith(boilerplate)), type(e).__name__)
        if "GLOBAL" in cause or "global" in cause:
            raise UserError(
                f"{path}: refused to load — the pickle asks to import or run code, which a weights "
                f"file never needs ({cause})"
            ) from None
        raise UserError(f"{path}: not a readable PyTorch file ({cause})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def _tensors_only(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    """A loaded state dict, checked to hold nothing but tensors."""
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                            "is this a training checkpoint rather than a weights file?")
    return obj


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating-point tensors to `dtype`; None keeps each as stored."""
    if dtype is None:
        return sd
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}


def _config(source: str, **fields) -> LlamaConfig:
    """LlamaConfig(**fields), naming the file the fields came from in any complaint about them."""
    try:
        return LlamaConfig(**fields)
    except (UserError, TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"{source}: {e}") from None


# --- Hugging Face directories -----------------------------------------------------------------

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


def config_from_hf(hf: dict, source: str) -> LlamaConfig:
    """Our config from a Hugging Face LlamaForCausalLM config.json (transformers 4.x or 5.x)."""
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise UserError(f"{source}: model_type is {model_type!r}; only 'llama' checkpoints can be loaded")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size"):
        if key not in hf:
            raise UserError(f"{source}: has no {key!r}; is this a LlamaForCausalLM config?")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {hf['hidden_act']!r} is not Llama's SiLU (SwiGLU)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError(f"{source}: attention_bias/mlp_bias are set; Llama's projections have no biases")
    n_heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // n_heads):
        raise UserError(
            f"{source}: head_dim {hf['head_dim']} ≠ hidden_size / num_attention_heads, as our Llama assumes"
        )
    # transformers 5 keeps RoPE settings in rope_parameters; 4.x in rope_theta + rope_scaling.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise UserError(f"{source}: RoPE scaling {rope_type!r} (e.g. Llama 3.1's) is not implemented here")
    return _config(
        source,
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads"),
        ffn_hidden_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=hf.get("tie_word_embeddings", False),
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


def _hf_weight_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face directory, safetensors preferred over pickles."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (directory / index).exists():
            weight_map = _read_json(directory / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{directory / index}: has no 'weight_map'")
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise UserError(f"{directory / index} names shard {missing[0]}, which is not in {directory}")
            return files
        if (directory / single).exists():
            return [directory / single]
    raise UserError(
        f"{directory}: has config.json but no weights (model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json)"
    )


def read_hf(directory: Path, dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    config_path = directory / "config.json"
    config = config_from_hf(_read_json(config_path), str(config_path))
    shapes = expected_shapes(config)
    sd, origin = {}, {}
    for path in _hf_weight_files(directory):
        if path.suffix == ".safetensors":
            tensors = _safetensors_load(path)
        else:
            tensors = _tensors_only(_torch_load(path), path)
        for key, tensor in tensors.items():
            if key.endswith("rotary_emb.inv_freq"):  # a cached constant older transformers saved
                continue
            name = hf_key_to_meta(key) or key
            if name in sd:
                raise UserError(f"{path}: tensor {key!r} also appears in {origin[name]}")
            if tuple(tensor.shape) == shapes.get(name):  # a wrong shape is reported by check()
                if name.endswith("attention.wq.weight"):
                    tensor = hf_to_meta_permute(tensor, config.n_heads)
                elif name.endswith("attention.wk.weight"):
                    tensor = hf_to_meta_permute(tensor, config.kv_heads)
            sd[name], origin[name] = tensor, f"{path}: tensor {key!r}"
    return Checkpoint(directory, "huggingface", config, str(config_path), _cast(sd, dtype), origin,
                      stored_as=meta_key_to_hf)


# --- Meta directories (params.json + consolidated.NN.pth) -------------------------------------

# How Meta's model parallelism (fairscale) split each matrix across consolidated.NN.pth files:
# ColumnParallelLinear splits the output features (dim 0), RowParallelLinear the input ones
# (dim 1); norms are replicated. The embedding is a ParallelEmbedding split along the model
# dimension (dim 1) in Llama 1 and 2, a VocabParallelEmbedding split along the vocabulary
# (dim 0) in Llama 3; the shard shapes tell which.
_COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                    "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


def merge_meta_shards(shards: list[dict[str, torch.Tensor]], d_model: int) -> dict[str, torch.Tensor]:
    """Undo Meta's model-parallel split: one state dict from consolidated.00.pth, .01.pth, ..."""
    if len(shards) == 1:
        return dict(shards[0])
    merged = {}
    for name in shards[0]:
        parts = [shard[name] for shard in shards]
        if name.endswith(_COLUMN_PARALLEL):
            dim = 0
        elif name.endswith(_ROW_PARALLEL):
            dim = 1
        elif name == "tok_embeddings.weight" and parts[0].ndim == 2:
            dim = 0 if parts[0].shape[1] == d_model else 1
        else:  # replicated: the norms
            merged[name] = parts[0]
            continue
        try:
            merged[name] = torch.cat(parts, dim=dim)
        except (RuntimeError, IndexError):
            shapes = ", ".join(str(tuple(p.shape)) for p in parts)
            raise UserError(
                f"tensor {name!r}: its shards have shapes {shapes}, which do not join along dim {dim}"
            ) from None
    return merged


def read_meta(directory: Path, dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    params_path = directory / "params.json"
    params = _read_json(params_path)
    files = sorted(directory.glob("consolidated.*.pth"))
    if not files:
        raise UserError(f"{directory}: has params.json but no consolidated.*.pth weights")
    if "dim" not in params or "n_layers" not in params or "n_heads" not in params:
        raise UserError(f"{params_path}: needs 'dim', 'n_layers' and 'n_heads'")
    if params.get("use_scaled_rope"):
        raise UserError(f"{params_path}: use_scaled_rope (Llama 3.1's RoPE scaling) is not implemented")
    shards = [_tensors_only(_torch_load(f), f) for f in files]
    for f, shard in zip(files[1:], shards[1:]):
        if shard.keys() != shards[0].keys():
            odd = sorted(shard.keys() ^ shards[0].keys())[0]
            raise UserError(f"{f}: tensor {odd!r} is in only one of {files[0].name} and {f.name}")
    try:
        sd = merge_meta_shards(shards, params["dim"])
    except UserError as e:
        raise UserError(f"{directory}: {e}") from None
    sd.pop("rope.freqs", None)  # Llama 1's precomputed RoPE frequencies; recomputed by the model
    vocab_size = params.get("vocab_size", -1)
    if vocab_size is None or vocab_size <= 0:  # "defined later by tokenizer": read the embedding
        if "tok_embeddings.weight" not in sd:
            raise UserError(f"{params_path}: vocab_size is {vocab_size} and there is no tok_embeddings")
        vocab_size = sd["tok_embeddings.weight"].shape[0]
    config = _config(
        str(params_path),
        vocab_size=vocab_size,
        d_model=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"),
        multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),
        # params.json does not record the context length: Llama 2's 4096, Llama 3's (θ = 500000) 8192
        max_seq_len=params.get("max_seq_len", 8192 if params.get("rope_theta", 0) >= 500000 else 4096),
        tie_embeddings="output.weight" not in sd,
    )
    where = files[0].name if len(files) == 1 else f"{files[0].name}..{files[-1].name}"
    origin = {name: f"{directory / where}: tensor {name!r}" for name in sd}
    return Checkpoint(directory, "meta", config, str(params_path), _cast(sd, dtype), origin)


# --- llama2.c .bin files ----------------------------------------------------------------------

LLAMA2C_MAGIC = 0x616B3432  # "ak42" as a little-endian uint32
# dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len (run.c's Config struct)
LLAMA2C_HEADER_V0 = struct.Struct("<7i")
LLAMA2C_HEADER_BYTES = 256  # version >= 1: everything before the weights


def _llama2c_layout(config: LlamaConfig, version: int) -> list[tuple[str, tuple[int, ...]]]:
    """The float32 tensors of a llama2.c file, in file order (`export.py` legacy/version1_export).

    Version 2 stores the same tensors as version 1 but quantized; see `_llama2c_q80_split`.
    """
    s = expected_shapes(config)
    layers = range(config.n_layers)

    def each(part: str) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"layers.{i}.{part}.weight", s[f"layers.{i}.{part}.weight"]) for i in layers]

    matrices = [*each("attention.wq"), *each("attention.wk"), *each("attention.wv"), *each("attention.wo")]
    ffn = [*each("feed_forward.w1"), *each("feed_forward.w2"), *each("feed_forward.w3")]
    output = [] if config.tie_embeddings else [("output.weight", s["output.weight"])]
    embedding = [("tok_embeddings.weight", s["tok_embeddings.weight"])]
    if version == 0:
        rope_table = (config.max_seq_len, config.head_dim // 2)  # cos and sin; ignored when read
        return [*embedding, *each("attention_norm"), *matrices, *each("ffn_norm"), *ffn,
                ("norm.weight", s["norm.weight"]), ("freq_cis_real", rope_table),
                ("freq_cis_imag", rope_table), *output]
    return [*each("attention_norm"), *each("ffn_norm"), ("norm.weight", s["norm.weight"]),
            *embedding, *matrices, *ffn, *output]


def _llama2c_q80_split(layout):
    """Version 2 keeps the norms in float32 and quantizes every matrix to int8 (Q8_0)."""
    norms = [(n, shape) for n, shape in layout if len(shape) == 1]
    matrices = [(n, shape) for n, shape in layout if len(shape) == 2]
    return norms, matrices


def _llama2c_config(header: tuple[int, ...], shared: bool) -> LlamaConfig:
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = header
    # llama2.c's run.c hard-codes RMSNorm ε = 1e-5 and RoPE θ = 10000.
    return LlamaConfig(vocab_size=abs(vocab_size), d_model=dim, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, ffn_hidden_dim=hidden_dim, norm_eps=1e-5,
                       rope_theta=10000.0, max_seq_len=seq_len, tie_embeddings=shared)


def _plausible_header(header: tuple[int, ...]) -> bool:
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = header
    return (min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, seq_len) > 0 and vocab_size != 0
            and dim % n_heads == 0 and n_heads % n_kv_heads == 0 and (dim // n_heads) % 2 == 0
            and max(dim, hidden_dim, n_layers, abs(vocab_size), seq_len) < 2**24)  # 16M: sanity


def _llama2c_size(config: LlamaConfig, version: int, group_size: int = 0) -> int:
    layout = _llama2c_layout(config, version)
    if version < 2:
        return 4 * sum(math.prod(shape) for _, shape in layout)
    norms, matrices = _llama2c_q80_split(layout)
    # int8 values plus one float32 scale per group of `group_size` (which divides every matrix)
    return 4 * sum(math.prod(s) for _, s in norms) + sum(
        math.prod(s) + 4 * (math.prod(s) // group_size) for _, s in matrices
    )


def _llama2c_header(path: Path) -> tuple[int, tuple[int, ...], bool, int, int]:
    """(version, 7 header ints, shared classifier, group size, byte offset of weights)."""
    with open(path, "rb") as f:
        head = f.read(LLAMA2C_HEADER_BYTES)
    if len(head) >= 4 and struct.unpack("<I", head[:4])[0] == LLAMA2C_MAGIC:
        if len(head) < LLAMA2C_HEADER_BYTES:
            raise UserError(f"{path}: truncated — a llama2.c v1+ header is 256 bytes, not {len(head)}")
        version = struct.unpack("<i", head[4:8])[0]
        if version not in (1, 2):
            raise UserError(f"{path}: llama2.c file version {version}; versions 0, 1 and 2 are supported")
        header = LLAMA2C_HEADER_V0.unpack(head[8:36])
        shared = bool(head[36])
        group_size = struct.unpack("<i", head[37:41])[0] if version == 2 else 0
        if not _plausible_header(header) or header[5] < 0 or (version == 2 and group_size <= 0):
            raise UserError(f"{path}: llama2.c header holds impossible sizes {header}")
        return version, header, shared, group_size, LLAMA2C_HEADER_BYTES
    if len(head) < LLAMA2C_HEADER_V0.size:
        raise UserError(f"{path}: {len(head)} bytes is too short for any checkpoint format")
    header = LLAMA2C_HEADER_V0.unpack(head[: LLAMA2C_HEADER_V0.size])
    # Version 0 has no magic: a negative vocab_size is its flag for "classifier stored separately".
    return 0, header, header[5] > 0, 0, LLAMA2C_HEADER_V0.size


def _is_llama2c(path: Path) -> bool:
    """A llama2.c magic, or a plausible version-0 header.

    Pickles and zip files cannot pass for the latter: their first four bytes read as an int32
    dim of over 16 million ("PK\x03\x04", or 0x80 + protocol + opcode).
    """
    version, header, _, _, _ = _llama2c_header(path)
    return version > 0 or _plausible_header(header)


def read_llama2c(path: Path, dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    version, header, shared, group_size, offset = _llama2c_header(path)
    names = "dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len"
    if not _plausible_header(header):
        raise UserError(
            f"{path}: not a recognised checkpoint — no llama2.c magic, and read as a version-0 header "
            f"({names}) = {header} is impossible; nor is it a PyTorch or safetensors file"
        )
    config = _llama2c_config(header, shared)
    if version == 2 and config.d_model % group_size:
        raise UserError(f"{path}: quantization group size {group_size} does not divide dim {config.d_model}")
    size, actual = offset + _llama2c_size(config, version, group_size), path.stat().st_size
    if actual != size:
        what = "truncated" if actual < size else f"{actual - size} bytes longer than expected"
        raise UserError(
            f"{path}: {what} — its llama2.c v{version} header ({names} = {header}) implies "
            f"{size} bytes, the file has {actual}"
        )
    data = np.memmap(path, dtype=np.uint8, mode="r")
    pos, sd = offset, {}

    def take(dtype_np, shape) -> np.ndarray:
        nonlocal pos
        n = math.prod(shape) * np.dtype(dtype_np).itemsize
        arr = np.frombuffer(data[pos:pos + n], dtype=dtype_np).reshape(shape)
        pos += n
        return arr

    layout = _llama2c_layout(config, 0 if version == 0 else 1)
    if version < 2:
        for name, shape in layout:
            sd[name] = torch.from_numpy(take("<f4", shape).copy())
    else:
        norms, matrices = _llama2c_q80_split(layout)
        for name, shape in norms:
            sd[name] = torch.from_numpy(take("<f4", shape).copy())
        for name, shape in matrices:  # Q8_0: int8 values, then one float32 scale per group
            q = torch.from_numpy(take("<i1", (math.prod(shape) // group_size, group_size)).copy())
            scale = torch.from_numpy(take("<f4", (q.shape[0], 1)).copy())
            sd[name] = (q.float() * scale).reshape(shape)
    sd.pop("freq_cis_real", None)
    sd.pop("freq_cis_imag", None)
    origin = {name: f"{path}: tensor {name!r}" for name in sd}
    return Checkpoint(path, f"llama2.c v{version}", config, f"the header of {path}", _cast(sd, dtype),
                      origin)


def _quantize_q80(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group of `group_size` values: w ≈ q · scale, q ∈ [-127, 127]."""
    groups = w.float().reshape(-1, group_size)
    scale = groups.abs().amax(dim=1) / 127.0
    q = torch.round(groups / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).to(torch.int8)
    return q, scale


def export_llama2c(model: Llama, path: str | Path, version: int = 1, group_size: int = 64) -> Path:
    """Write `model` as a llama2.c .bin file that karpathy's run.c (v0, v1) or runq.c (v2) runs.

    Version 0 is the legacy bare header; 1 adds the "ak42" magic and a 256-byte header; 2
    quantizes every matrix to int8 in groups of `group_size` (halved until it divides d_model).
    """
    config, path = model.config, Path(path)
    if version not in (0, 1, 2):
        raise UserError(f"llama2.c has file versions 0, 1 and 2, not {version}")
    if config.rope_theta != 10000.0 or config.norm_eps != 1e-5:
        raise UserError(
            f"llama2.c's run.c hard-codes rope_theta=10000 and norm_eps=1e-5; this model has "
            f"rope_theta={config.rope_theta}, norm_eps={config.norm_eps}: run.c would compute another model"
        )
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    half = torch.arange(0, config.head_dim, 2, dtype=torch.float32)[: config.head_dim // 2] / config.head_dim
    angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float32), 1.0 / config.rope_theta**half)
    sd["freq_cis_real"], sd["freq_cis_imag"] = torch.cos(angles), torch.sin(angles)
    header = (config.d_model, config.hidden_dim, config.n_layers, config.n_heads, config.kv_heads,
              config.vocab_size, config.max_seq_len)
    layout = _llama2c_layout(config, 0 if version == 0 else 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if version == 0:
                vocab = config.vocab_size if config.tie_embeddings else -config.vocab_size
                f.write(LLAMA2C_HEADER_V0.pack(*header[:5], vocab, header[6]))
            else:
                while config.d_model % group_size:
                    group_size //= 2
                f.write(struct.pack("<Ii", LLAMA2C_MAGIC, version) + LLAMA2C_HEADER_V0.pack(*header))
                f.write(struct.pack("<B", int(config.tie_embeddings)))
                if version == 2:
                    f.write(struct.pack("<i", group_size))
                f.write(b"\0" * (LLAMA2C_HEADER_BYTES - f.tell()))
            if version < 2:
                for name, _ in layout:
                    f.write(sd[name].numpy().astype("<f4").tobytes())
            else:
                norms, matrices = _llama2c_q80_split(layout)
                for name, _ in norms:
                    f.write(sd[name].numpy().astype("<f4").tobytes())
                for name, _ in matrices:
                    q, scale = _quantize_q80(sd[name], group_size)
                    f.write(q.numpy().astype("<i1").tobytes() + scale.numpy().astype("<f4").tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --- llama2.c's training checkpoints (ckpt.pt) ------------------------------------------------


def read_llama2c_training(path: Path, obj: dict, dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    """The `{"model_args": ..., "model": state_dict, ...}` that llama2.c's train.py saves."""
    args, state = obj["model_args"], obj["model"]
    if not isinstance(args, dict) or not isinstance(state, dict):
        raise UserError(f"{path}: model_args and model should both be dicts")
    # torch.compile'd models save their weights under an "_orig_mod." prefix
    sd = {k.removeprefix("_orig_mod."): v for k, v in _tensors_only(state, path).items()}
    out, emb = sd.get("output.weight"), sd.get("tok_embeddings.weight")
    tied = out is None or (emb is not None and torch.equal(out, emb))  # llama2.c always ties them
    missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size") if k not in args]
    if missing:
        raise UserError(f"{path}: model_args lacks {missing[0]!r}")
    config = _config(
        f"model_args in {path}",
        vocab_size=args["vocab_size"], d_model=args["dim"], n_layers=args["n_layers"],
        n_heads=args["n_heads"], n_kv_heads=args.get("n_kv_heads"), multiple_of=args.get("multiple_of", 256),
        ffn_hidden_dim=args.get("hidden_dim"), norm_eps=args.get("norm_eps", 1e-5),
        max_seq_len=args.get("max_seq_len", 2048), tie_embeddings=tied,
    )
    origin = {name: f"{path}: tensor {name!r}" for name in sd}
    return Checkpoint(path, "llama2.c training checkpoint", config, f"model_args in {path}", _cast(sd, dtype),
                      origin)


# --- our own training runs (fromscratch.engine) -----------------------------------------------


def _step_dir_of_run(run_dir: Path) -> Path:
    index = read_index(run_dir)
    name = index.get("latest")
    if name:
        for candidate in (run_dir / "checkpoints" / name, run_dir / name):
            if (candidate / MODEL_FILE).exists():
                return candidate
        raise UserError(f"{run_dir / INDEX}: its latest checkpoint {name!r} has no {MODEL_FILE}")
    # No index (e.g. it was deleted): the highest-numbered complete checkpoint.
    steps = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / MODEL_FILE).exists())
    if not steps:
        raise UserError(f"{run_dir}: a training run directory with no checkpoints yet")
    return steps[-1]


def read_run(path: Path, dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    """A run directory (its latest checkpoint) or one checkpoint directory of it."""
    step_dir = path if (path / MODEL_FILE).exists() else _step_dir_of_run(path)
    run_dir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent
    places = (step_dir, run_dir, path)
    config_path = next((d / MODEL_CONFIG for d in places if (d / MODEL_CONFIG).exists()), None)
    if config_path is None:
        raise UserError(f"{step_dir}: has {MODEL_FILE} but no {MODEL_CONFIG} here or in its run directory")
    try:
        config = LlamaConfig.from_dict(_read_json(config_path))
    except (UserError, TypeError, ValueError) as e:
        raise UserError(f"{config_path}: not a Llama model config ({e})") from None
    weights = step_dir / MODEL_FILE
    try:
        sd = load_model_weights(weights)
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise UserError(f"{weights}: not a readable safetensors file ({e})") from None
    origin = {name: f"{weights}: tensor {name!r}" for name in sd}
    return Checkpoint(step_dir, "fromscratch run", config, str(config_path), _cast(sd, dtype), origin)


# --- detection --------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    """Read any supported checkpoint at `path` and check it strictly against its own config.

    Floating-point weights are cast to `dtype`; None keeps them as stored.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist")
    ckpt = _read_any(path, dtype)
    ckpt.check()
    return ckpt


def _read_any(path: Path, dtype: torch.dtype | None) -> Checkpoint:
    if path.is_dir():
        if (path / "config.json").exists():
            return read_hf(path, dtype)
        if (path / "params.json").exists():
            return read_meta(path, dtype)
        if (path / MODEL_FILE).exists() or (path / INDEX).exists() or (path / MODEL_CONFIG).exists():
            return read_run(path, dtype)
        raise UserError(
            f"{path}: not a recognised checkpoint directory — expected config.json (Hugging Face), "
            f"params.json (Meta), or {MODEL_FILE} / {INDEX} (a fromscratch training run)"
        )
    # A single file: the directory it sits in may be what describes it.
    parent = path.parent
    if path.suffix == ".json":  # config.json, params.json, an index, checkpoints.json, ...
        return _read_any(parent, dtype)
    if path.suffix == ".safetensors":
        if (parent / "config.json").exists():
            return read_hf(parent, dtype)
        if path.name == MODEL_FILE:
            return read_run(parent, dtype)
        raise UserError(f"{path}: a safetensors file with no config.json beside it; pass its directory")
    if path.name.startswith("consolidated.") and (parent / "params.json").exists():
        return read_meta(parent, dtype)
    if path.stat().st_size >= LLAMA2C_HEADER_V0.size and _is_llama2c(path):
        return read_llama2c(path, dtype)  # first: a v0 header with dim = 640 starts like a pickle
    if _is_torch_pickle(path):
        if (parent / "config.json").exists():
            return read_hf(parent, dtype)
        obj = _torch_load(path)
        if "model_args" in obj and "model" in obj:
            return read_llama2c_training(path, obj, dtype)
        raise UserError(
            f"{path}: a PyTorch file with no config beside it (config.json or params.json) and not a "
            "llama2.c training checkpoint; pass the directory that holds the config"
        )
    return read_llama2c(path, dtype)


def build_model(ckpt: Checkpoint, dtype: torch.dtype | None = torch.float32) -> Llama:
    """A `Llama` holding a checked checkpoint's weights, in `dtype` (None: float32).

    The model is built on the meta device (shapes only, no memory, no random initialisation)
    and the checkpoint's tensors become its parameters: loading a 7B checkpoint needs the
    checkpoint's memory once, not twice."""
    with torch.device("meta"):
        model = Llama(ckpt.config)
    sd = dict(ckpt.state_dict)  # already checked against the config: names and shapes
    if ckpt.config.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    dtype = dtype or torch.float32
    model.load_state_dict({name: tensor.to(dtype).contiguous() for name, tensor in sd.items()},
                          strict=True, assign=True)
    if ckpt.config.tie_embeddings:  # assign=True gave the two names two Parameters: one again
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32) -> Llama:
    """Load a Llama from any supported checkpoint (see the module docstring), weights cast to `dtype`."""
    return build_model(read_checkpoint(path, dtype), dtype)


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

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_WEIGHT_NAMES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _write_hf_files(config: LlamaConfig, state_dict: dict[str, torch.Tensor], out: Path,
                    tokenizer_path: Path | None) -> None:
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
    dtypes = {t.dtype for t in tensors.values()}
    hf_config = config_to_hf(config)
    hf_config["torch_dtype"] = str(dtypes.pop() if len(dtypes) == 1 else torch.float32).removeprefix("torch.")
    hf_config.update(_special_token_ids(tokenizer_path))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer_path is not None:
        _copy_tokenizer(Path(tokenizer_path), out)


def write_hf(config: LlamaConfig, state_dict: dict[str, torch.Tensor], out_dir: str | Path,
             tokenizer_path: str | Path | None = None) -> Path:
    """Write a Hugging Face Llama directory, all at once or not at all.

    Files go to a temporary sibling directory that is renamed into place only when complete.
    An existing model directory is replaced; its files we do not write (a README, a tokenizer
    when none is given) are carried over.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").exists():
        raise UserError(f"{out} exists, is not empty and holds no model; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        _write_hf_files(config, state_dict, tmp, tokenizer_path)
        if out.is_dir():
            for item in out.iterdir():
                stale = item.suffix in _WEIGHT_SUFFIXES or item.name in _WEIGHT_NAMES
                if not stale and not (tmp / item.name).exists():
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def save_pretrained(model: Llama, out_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """Write `model` as a Hugging Face directory that `LlamaForCausalLM.from_pretrained` loads."""
    return write_hf(model.config, model.state_dict(), out_dir, tokenizer_path)


def convert(checkpoint_path: str | Path, out_dir: str | Path,
            tokenizer_path: str | Path | None = None) -> Path:
    """Any supported checkpoint -> a Hugging Face directory, its tokenizer carried along if found.

    Weights keep the dtype they were stored in (a bf16 Meta download stays bf16).
    """
    ckpt = read_checkpoint(checkpoint_path, dtype=None)
    tokenizer_path = tokenizer_path or find_tokenizer(checkpoint_path)
    return write_hf(ckpt.config, ckpt.state_dict, out_dir, tokenizer_path)
