"""Reading weights and configs safely (no pickle runs code, no tensor is silently mistyped), and
writing them readable by all.

- Pickled files (`.pth`, `.bin`, `.pt`) are opened only with `torch.load(weights_only=True)`,
  which refuses any pickle that would import or call code.
- Model weights must be floating point. An integer or boolean tensor where a weight belongs is
  a broken or foreign file; casting it to float would turn it into garbage weights without a word.
- A JSON config must be an object ({...}): `[]` or `"text"` is refused, naming the file.
- Files written for others to read (checkpoints, converted models) get the usual 0644 mode:
  the temporary files they are written through are created private (0600).
"""

import json
import os
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fromscratch.errors import UserError


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in `path`; UserError naming the file if it is not one."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: holds a JSON {type(value).__name__}, not an object ({{...}})")
    return value


def check_float_weights(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """`tensors`, after checking that every one is floating point (UserError naming it if not)."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise UserError(f"{where}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}, "
                            "not floating point: not a weight this model can use")
    return tensors


def load_safetensors(path: str | os.PathLike, float_only: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; with `float_only`, only if all are floating point."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    return check_float_weights(tensors, str(path)) if float_only else tensors


def is_torch_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def torch_load(path: str | os.PathLike) -> dict:
    """Unpickle with `weights_only=True` (tensors and plain containers only, never code) into a dict."""
    path = Path(path)
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


def tensors_only(obj: dict, path: str | os.PathLike, float_only: bool = True) -> dict[str, torch.Tensor]:
    """A loaded state dict, checked to hold nothing but (floating-point) tensors."""
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                            "is this a training checkpoint rather than a weights file?")
    return check_float_weights(obj, str(path)) if float_only else obj


def readable_by_all(path: str | os.PathLike) -> None:
    """Give a file we wrote the mode an ordinary new file gets (0644 under the usual umask), or a
    directory 0755: files made through tempfile are private (0600) until this is done."""
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, mode & ~umask)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write `tensors` to a safetensors file readable by all (safetensors itself creates 0600)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    readable_by_all(path)
