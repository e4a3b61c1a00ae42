"""Checkpoints that survive a kill at any moment, and hold everything an exact resume needs.

Layout of a run directory:

    RUN_DIR/run.json                  the model, command, model config and training config of the run,
                                      and the hardware of its start and of each resume
    RUN_DIR/model_config.json         the model's config (what `from_pretrained(RUN_DIR)` reads)
    RUN_DIR/checkpoints.json          {"latest": "step-00000200", "best": "step-00000100", ...}
    RUN_DIR/checkpoints/step-XXXXXXXX/
        model.safetensors             model weights (tied weights stored once)
        optimizer.safetensors         optimizer tensors (Adam moments, step counts)
        rng-rank{R}.safetensors       each process's torch CPU/CUDA generator state
        trainer_state.json            step, token count, optimizer hyper-parameters, Python and
                                      NumPy RNG states, gradient-scaler state, best metric

Nothing is pickled: every tensor is in safetensors and everything else in JSON, so loading a
checkpoint cannot run code. A checkpoint is written into a temporary directory, every file is
fsync'ed, and only then is the directory renamed into place and the index replaced (rename is
atomic on POSIX). A kill during a save therefore leaves the previous checkpoint and index intact.
Every file is readable by all (0644), like any file the user writes.

Which checkpoint a run directory stands for when a model is loaded from it (its best, else its
latest) is decided in one place for every model: `fromscratch.checkpoints.resolve`.
"""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from fromscratch.checkpoints.runs import INDEX, MODEL_CONFIG, MODEL_FILE, RUN_RECORD, load_model_weights, save_model_weights
from fromscratch.checkpoints.safe import load_safetensors, read_json_object, save_safetensors
from fromscratch.errors import UserError

__all__ = ["INDEX", "MODEL_CONFIG", "MODEL_FILE", "RUN_RECORD", "load_model_weights", "save_model_weights"]


# --- atomic file primitives -------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the new one, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    save_safetensors(tensors, path, metadata)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Any tensors (optimizer moments, RNG states) of a safetensors file we wrote."""
    return load_safetensors(path, float_only=False)


# --- RNG state --------------------------------------------------------------------------------


def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    """Every random stream a training step can draw from: (JSON-able part, tensor part)."""
    version, mt_state, gauss = random.getstate()
    np_state = np.random.get_state()
    json_part = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    return json_part, tensors


def restore_rng(json_part: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, mt_state, gauss = json_part["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


# --- optimizer state (name-keyed, from torch.distributed.checkpoint.state_dict) ----------------


def flatten_optimizer_state(optim_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into safetensors-able tensors and a JSON-able rest."""
    tensors, scalars = {}, {}
    for param_name, state in optim_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_name}::{key}"] = value
            else:
                scalars.setdefault(param_name, {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in optim_state["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[str, dict] = {}
    for flat_name, value in tensors.items():
        param_name, key = flat_name.rsplit("::", 1)
        state.setdefault(param_name, {})[key] = value
    for param_name, values in rest["scalars"].items():
        state.setdefault(param_name, {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


# --- the index of checkpoints in a run --------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def read_index(run_dir: Path) -> dict:
    path = Path(run_dir) / INDEX
    if not path.exists():
        return {}
    try:
        return read_json_object(path)
    except UserError as e:
        raise UserError(f"{e}; the index is corrupt (the checkpoints themselves are in "
                        f"{path.parent / 'checkpoints'})") from None


def checkpoint_dir(run_dir: Path, which: str = "latest") -> Path | None:
    """The directory of the run's latest (or best) checkpoint, or None if it has none (what
    --resume continues from; loading a model from a run follows `fromscratch.checkpoints.resolve`)."""
    index = read_index(run_dir)
    name = index.get(which) or index.get("latest")
    return Path(run_dir) / "checkpoints" / name if name else None


def temporary_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f".{checkpoint_name(step)}.tmp"


def prepare_checkpoint(run_dir: Path, step: int) -> Path:
    """Create the empty temporary directory that checkpoint `step` is written into (rank 0)."""
    (Path(run_dir) / "checkpoints").mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def seal_checkpoint(
    run_dir: Path,
    step: int,
    tmp: Path,
    model_state: dict[str, torch.Tensor],
    optim_tensors: dict[str, torch.Tensor],
    trainer_state: dict,
    is_best: bool,
    keep_last: int,
) -> Path:
    """Finish checkpoint `step` in `tmp`, rename it into place, update the index, prune (rank 0)."""
    root = Path(run_dir) / "checkpoints"
    name = checkpoint_name(step)
    final = root / name
    save_model_weights(model_state, tmp / MODEL_FILE)
    save_tensors(optim_tensors, tmp / "optimizer.safetensors")
    write_json(tmp / "trainer_state.json", trainer_state)
    fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. a best and a periodic save coincide)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)

    index = read_index(run_dir)
    index["latest"] = name
    if is_best:
        index["best"] = name
    kept = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    recent = set(kept[-keep_last:]) | {index.get("best"), name}
    index["kept"] = [k for k in kept if k in recent]
    write_json(Path(run_dir) / INDEX, index)
    for old in kept:  # only once the index no longer points at them
        if old not in recent:
            shutil.rmtree(root / old, ignore_errors=True)
    return final


def remove_stale_temporaries(run_dir: Path) -> None:
    """Half-written checkpoints from a process killed mid-save."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.glob(".step-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
