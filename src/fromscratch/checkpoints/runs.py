"""Training runs on disk: their layout, their model weights, and which checkpoint a run stands for.

`fromscratch.engine` writes runs (`engine/checkpoint.py`); every model reads them through here:

    RUN_DIR/run.json              which model, the command, model and training configs
    RUN_DIR/model_config.json     the model's config
    RUN_DIR/checkpoints.json      {"latest": "step-00000200", "best": "step-00000100", ...}
    RUN_DIR/checkpoints/step-XXXXXXXX/model.safetensors   the weights (tied weights stored once)

The rule every model follows when it loads a model from a run (`--checkpoint RUN_DIR`,
`from_pretrained(RUN_DIR)`): a run directory stands for its **best** checkpoint — the one with
the best validation metric (`"best"` in `checkpoints.json`) — or its **latest** when no
evaluation has chosen a best yet. Name a step directory (`RUN_DIR/checkpoints/step-00001200`) to
load any other. (`--resume` always continues from the latest: it resumes training, not a model.)
"""

import json
import os
from pathlib import Path

import torch

from fromscratch.checkpoints.safe import load_safetensors, read_json_object, save_safetensors
from fromscratch.errors import UserError

INDEX = "checkpoints.json"
MODEL_FILE = "model.safetensors"
MODEL_CONFIG = "model_config.json"
RUN_RECORD = "run.json"


def unique_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop entries that share storage with an earlier one (tied weights); return (unique, aliases)."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor
    return unique, aliases


def save_model_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    unique, aliases = unique_state_dict(state_dict)
    save_safetensors(unique, path, metadata={"aliases": json.dumps(aliases)})
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read weights written by `save_model_weights`, restoring tied (aliased) names. Every
    tensor must be floating point (UserError naming it otherwise)."""
    from safetensors import safe_open

    tensors = load_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        try:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        except json.JSONDecodeError:
            raise UserError(f"{path}: its 'aliases' metadata is not JSON") from None
    if not isinstance(aliases, dict) or any(target not in tensors for target in aliases.values()):
        raise UserError(f"{path}: its 'aliases' metadata names tensors the file does not hold")
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


def is_run_directory(path: Path) -> bool:
    return any((path / name).is_file() for name in (INDEX, RUN_RECORD, MODEL_CONFIG))


def run_checkpoint(path: str | os.PathLike) -> tuple[Path, Path] | None:
    """(checkpoint directory, run directory) when `path` is a training run or a checkpoint inside
    one, by the rule of the module docstring; None when it is neither."""
    path = Path(path)
    if (path / MODEL_FILE).is_file() and path.parent.name == "checkpoints":
        return path, path.parent.parent
    if not is_run_directory(path):
        return None
    index = read_json_object(path / INDEX) if (path / INDEX).is_file() else {}
    for which in ("best", "latest"):
        name = index.get(which)
        if name is not None and not isinstance(name, str):
            raise UserError(f"{path / INDEX}: {which!r} should name a checkpoint, not {name!r}")
        if name and (path / "checkpoints" / name / MODEL_FILE).is_file():
            return path / "checkpoints" / name, path
    # No usable index (deleted or damaged): the highest-numbered complete checkpoint.
    steps = sorted(p for p in (path / "checkpoints").glob("step-*") if (p / MODEL_FILE).is_file())
    if not steps:
        raise UserError(f"{path}: a training run with no complete checkpoint yet")
    return steps[-1], path


def check_run_model(run_dir: Path, model: str) -> None:
    """Refuse a run directory that another model's training made, saying which model it belongs
    to (from its run.json: "model", and the command that started it)."""
    record_path = Path(run_dir) / RUN_RECORD
    record = read_json_object(record_path) if record_path.is_file() else {}
    owner = record.get("model")
    if owner is not None and owner != model:
        command = record.get("command")
        how = f" (started by `{' '.join(map(str, command[:3]))} ...`)" if isinstance(command, list) else ""
        raise UserError(f"{run_dir} holds a {owner} run{how}, not a {model} one")


def read_run(path: str | os.PathLike, model: str) -> tuple[dict, dict, Path, Path]:
    """The weights and model config of a `model` training run (by the rule above):
    (state_dict, model_config dict, checkpoint directory, run directory).

    Refuses, naming the model, a run that another model's `train` made."""
    found = run_checkpoint(path)
    if found is None and not Path(path).exists():
        raise UserError(f"{path}: no such file or directory (nor a training run directory)")
    if found is None:
        raise UserError(f"{path}: not a training run directory (no {INDEX}) nor a checkpoint in one")
    step_dir, run_dir = found
    check_run_model(run_dir, model)
    config_path = next((d / MODEL_CONFIG for d in (step_dir, run_dir) if (d / MODEL_CONFIG).is_file()), None)
    if config_path is None:
        raise UserError(f"{step_dir}: has {MODEL_FILE} but no {MODEL_CONFIG} here or in {run_dir}")
    return load_model_weights(step_dir / MODEL_FILE), read_json_object(config_path), step_dir, run_dir


def average_last_checkpoints(run_dir: str | os.PathLike, n: int, model: str) -> tuple[dict, dict, list[Path]]:
    """The element-wise mean of the weights of a run's `n` most recent checkpoints (§6.1 of
    Vaswani et al. 2017: "we used a single model obtained by averaging the last 5 checkpoints").

    Returns (averaged state_dict, model_config dict, the checkpoint directories averaged). The
    run keeps as many as `--keep-last` says; asking for more is a UserError naming how many exist.
    """
    run_dir = Path(run_dir)
    if run_checkpoint(run_dir) is None or run_dir.parent.name == "checkpoints":
        raise UserError(f"{run_dir}: averaging needs a training run directory")
    check_run_model(run_dir, model)
    if n < 1:
        raise UserError(f"--average must be at least 1, got {n}")
    steps = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / MODEL_FILE).is_file())
    if len(steps) < n:
        raise UserError(f"--average {n}: {run_dir} keeps {len(steps)} checkpoint(s); train with --keep-last {n} "
                        "or more to average that many")
    chosen = steps[-n:]
    total = None
    for step_dir in chosen:
        state = load_model_weights(step_dir / MODEL_FILE)
        if total is None:
            total = {name: tensor.double() for name, tensor in state.items()}
        else:
            if state.keys() != total.keys():
                raise UserError(f"{step_dir}: holds other tensors than {chosen[0]}; cannot average them")
            for name, tensor in state.items():
                total[name] += tensor
    averaged = {name: (tensor / n).float() for name, tensor in total.items()}
    config_path = next((d / MODEL_CONFIG for d in (chosen[-1], run_dir) if (d / MODEL_CONFIG).is_file()))
    return averaged, read_json_object(config_path), chosen
