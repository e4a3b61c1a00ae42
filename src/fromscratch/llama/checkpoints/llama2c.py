"""Karpathy's llama2.c checkpoints: `.bin` files (versions 0, 1 and the int8 version 2) read and
written, and the `ckpt.pt` its training script saves.

A `.bin` file is a header of seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len) and float32 weights in the order of llama2.c's `export.py`; version 1 adds
the magic "ak42" and pads the header to 256 bytes; version 2 stores every matrix as int8 groups
with one float32 scale each (Q8_0). run.c hard-codes RMSNorm ε = 1e-5 and RoPE θ = 10000.
"""

import math
import os
import struct
from pathlib import Path

import numpy as np
import torch

from fromscratch.checkpoints.safe import tensors_only
from fromscratch.errors import UserError
from fromscratch.inputs import checked_output
from fromscratch.llama.checkpoints.common import Checkpoint, cast, expected_shapes, make_config
from fromscratch.llama.config import LlamaConfig

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


def is_llama2c(path: Path) -> bool:
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
    return Checkpoint(path, f"llama2.c v{version}", config, f"the header of {path}", cast(sd, dtype),
                      origin)


def _quantize_q80(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group of `group_size` values: w ≈ q · scale, q ∈ [-127, 127]."""
    groups = w.float().reshape(-1, group_size)
    scale = groups.abs().amax(dim=1) / 127.0
    q = torch.round(groups / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).to(torch.int8)
    return q, scale


def export_llama2c(model, path: str | Path, version: int = 1, group_size: int = 64) -> Path:
    """Write `model` as a llama2.c .bin file that karpathy's run.c (v0, v1) or runq.c (v2) runs.

    Version 0 is the legacy bare header; 1 adds the "ak42" magic and a 256-byte header; 2
    quantizes every matrix to int8 in groups of `group_size` (halved until it divides d_model).
    """
    if not hasattr(model, "config") or not hasattr(model, "state_dict"):
        raise TypeError(f"export_llama2c takes a model (Llama.from_pretrained(...)), got {type(model).__name__}")
    config, path = model.config, checked_output(path, "the llama2.c file")
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
    sd = {k.removeprefix("_orig_mod."): v for k, v in tensors_only(state, path).items()}
    out, emb = sd.get("output.weight"), sd.get("tok_embeddings.weight")
    tied = out is None or (emb is not None and torch.equal(out, emb))  # llama2.c always ties them
    missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size") if k not in args]
    if missing:
        raise UserError(f"{path}: model_args lacks {missing[0]!r}")
    config = make_config(
        f"model_args in {path}",
        vocab_size=args["vocab_size"], d_model=args["dim"], n_layers=args["n_layers"],
        n_heads=args["n_heads"], n_kv_heads=args.get("n_kv_heads"), multiple_of=args.get("multiple_of", 256),
        ffn_hidden_dim=args.get("hidden_dim"), norm_eps=args.get("norm_eps", 1e-5),
        max_seq_len=args.get("max_seq_len", 2048), tie_embeddings=tied,
    )
    origin = {name: f"{path}: tensor {name!r}" for name in sd}
    return Checkpoint(path, "llama2.c training checkpoint", config, f"model_args in {path}", cast(sd, dtype),
                      origin)
