"""Hugging Face model directories: reading their weights, writing a new one atomically.

A Hugging Face directory holds `config.json` and the weights in one of four layouts:
`model.safetensors`, shards `model-0000i-of-0000n.safetensors` listed by
`model.safetensors.index.json`, `pytorch_model.bin`, or `.bin` shards with their index.
Safetensors are preferred when both exist. Each model's converter (Llama, Marian, Mixtral, ViT,
CLIP) maps the key names and checks the shapes; what is common is here.
"""

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fromscratch.checkpoints.safe import (
    check_float_weights,
    load_safetensors,
    read_json_object,
    readable_by_all,
    tensors_only,
    torch_load,
)
from fromscratch.errors import UserError
from fromscratch.inputs import checked_output_dir

WEIGHT_LAYOUTS = (("model.safetensors", "model.safetensors.index.json"),
                  ("pytorch_model.bin", "pytorch_model.bin.index.json"))
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_WEIGHT_NAMES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face directory, safetensors preferred over pickles, and a
    single file over an index beside it, as transformers chooses (its `save_pretrained` leaves a
    sharded save's index behind when it writes one file over it)."""
    directory = Path(directory)
    for single, index in WEIGHT_LAYOUTS:
        if (directory / single).exists():
            return [directory / single]
        if (directory / index).exists():
            weight_map = read_json_object(directory / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{directory / index}: has no 'weight_map' object")
            for key, name in weight_map.items():
                if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                    raise UserError(f"{directory / index}: weight_map gives {key!r} the shard {name!r}, not the "
                                    "name of a file in the directory")
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise UserError(f"{directory / index} names shard {missing[0]}, which is not in {directory}")
            return files
    raise UserError(
        f"{directory}: has no weights (model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json)"
    )


def read_weights(directory: Path, skip: Callable[[str], bool] = lambda key: False
                 ) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Every tensor of the directory's weight files as (key, tensor, "file: tensor 'key'"),
    except those `skip(key)` drops (constant buffers some writers save). Each must be floating
    point, and no key may appear in two shards."""
    seen: dict[str, str] = {}
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            tensors = load_safetensors(path, float_only=False)
        else:
            tensors = tensors_only(torch_load(path), path, float_only=False)
        tensors = {key: tensor for key, tensor in tensors.items() if not skip(key)}
        check_float_weights(tensors, str(path))
        for key, tensor in tensors.items():
            origin = f"{path}: tensor {key!r}"
            if key in seen:
                raise UserError(f"{origin} also appears in {seen[key]}")
            seen[key] = origin
            yield key, tensor, origin


def write_model_directory(out_dir: str | os.PathLike, write_files: Callable[[Path], None]) -> Path:
    """Write a model directory all at once or not at all: `write_files(tmp)` fills a temporary
    sibling directory, which is renamed into place only when complete.

    An existing model directory is replaced; its files that are not weights or configs (a README,
    a tokenizer when none is written) are carried over. A non-empty directory that holds no
    model is never replaced. Everything written is readable by all (0644 files, 0755 directory).
    """
    out = Path(out_dir).expanduser().resolve()
    checked_output_dir(out, "the model directory")  # a file, under one, or in a folder we cannot write
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").exists():
        raise UserError(f"{out} exists, is not empty and holds no model; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        write_files(tmp)
        if out.is_dir():
            for item in out.iterdir():
                stale = item.suffix in _WEIGHT_SUFFIXES or item.name in _WEIGHT_NAMES
                if not stale and not (tmp / item.name).exists():
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        for item in tmp.rglob("*"):
            readable_by_all(item)
        readable_by_all(tmp)
        if out.is_dir():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out
