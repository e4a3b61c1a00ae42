"""Our own training runs (`fromscratch llama train`): a run directory or one checkpoint in it.

Which checkpoint a run directory stands for (its best, else its latest) is the package-wide rule
of `fromscratch.checkpoints.resolve`.
"""

from pathlib import Path

import torch

from fromscratch.checkpoints.runs import read_run as read_run_files
from fromscratch.llama.checkpoints.common import Checkpoint, cast, expected_shapes
from fromscratch.llama.config import LlamaConfig


def read_run(path: Path, dtype: torch.dtype | None = torch.float32, model_name: str = "llama",
             config_class: type = LlamaConfig, shapes=expected_shapes) -> Checkpoint:
    """The checkpoint a `model_name` run directory (or one of its step directories) stands for."""
    sd, config_dict, step_dir, _ = read_run_files(path, model_name)
    config = config_class.from_dict(config_dict, source=f"{step_dir} (model_config.json)")
    weights = step_dir / "model.safetensors"
    origin = {name: f"{weights}: tensor {name!r}" for name in sd}
    return Checkpoint(step_dir, "fromscratch run", config, f"{step_dir} (model_config.json)", cast(sd, dtype),
                      origin, shapes=shapes)
