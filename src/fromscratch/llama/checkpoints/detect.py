"""Which Llama checkpoint format a path holds, told from what is on disk."""

from pathlib import Path

import torch

from fromscratch.checkpoints.resolve import resolve_checkpoint
from fromscratch.checkpoints.runs import is_run_directory, run_checkpoint
from fromscratch.checkpoints.safe import is_torch_pickle, torch_load
from fromscratch.errors import UserError
from fromscratch.llama.checkpoints.common import Checkpoint
from fromscratch.llama.checkpoints.huggingface import read_hf
from fromscratch.llama.checkpoints.llama2c import LLAMA2C_HEADER_V0, is_llama2c, read_llama2c, read_llama2c_training
from fromscratch.llama.checkpoints.meta import read_meta
from fromscratch.llama.checkpoints.runs import read_run

HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
             "pytorch_model.bin.index.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "generation_config.json"]


def read_checkpoint(spec: str | Path, dtype: torch.dtype | None = torch.float32) -> Checkpoint:
    """Read the checkpoint `spec` names — a path in any supported format, a training run, or a hub
    name (`fromscratch.checkpoints.resolve`) — and check it strictly against its own config.

    Floating-point weights are cast to `dtype`; None keeps them as stored.
    """
    ckpt = read_any(resolve_checkpoint(spec, allow_patterns=HUB_FILES), dtype)
    ckpt.check()
    return ckpt


def read_any(path: Path, dtype: torch.dtype | None) -> Checkpoint:
    if path.is_dir():
        if (path / "config.json").exists():
            return read_hf(path, dtype)
        if (path / "params.json").exists():
            return read_meta(path, dtype)
        if is_run_directory(path) or run_checkpoint(path) is not None:
            return read_run(path, dtype)
        raise UserError(
            f"{path}: not a recognised checkpoint directory — expected config.json (Hugging Face), "
            "params.json (Meta), or checkpoints.json (a fromscratch training run)"
        )
    # A single file: the directory it sits in may be what describes it.
    parent = path.parent
    if path.suffix == ".json":  # config.json, params.json, an index, checkpoints.json, ...
        return read_any(parent, dtype)
    if path.suffix == ".safetensors":
        if (parent / "config.json").exists():
            return read_hf(parent, dtype)
        if run_checkpoint(parent) is not None:
            return read_run(parent, dtype)
        raise UserError(f"{path}: a safetensors file with no config.json beside it; pass its directory")
    if path.name.startswith("consolidated.") and (parent / "params.json").exists():
        return read_meta(parent, dtype)
    if path.stat().st_size >= LLAMA2C_HEADER_V0.size and is_llama2c(path):
        return read_llama2c(path, dtype)  # first: a v0 header with dim = 640 starts like a pickle
    if is_torch_pickle(path):
        if (parent / "config.json").exists():
            return read_hf(parent, dtype)
        obj = torch_load(path)
        if "model_args" in obj and "model" in obj:
            return read_llama2c_training(path, obj, dtype)
        raise UserError(
            f"{path}: a PyTorch file with no config beside it (config.json or params.json) and not a "
            "llama2.c training checkpoint; pass the directory that holds the config"
        )
    return read_llama2c(path, dtype)
