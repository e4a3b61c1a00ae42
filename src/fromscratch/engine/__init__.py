"""The shared training engine: loop, checkpoints, schedules, distributed data parallel, metrics.

It knows nothing about any particular model; see `trainer.py` for the task interface.
"""

from fromscratch.engine.checkpoint import checkpoint_dir
from fromscratch.engine.config import (
    TrainConfig,
    add_train_arguments,
    engine_options,
    make_train_config,
    train_config_from_args,
)
from fromscratch.engine.trainer import Trainer, TrainingStopped, check_run_state, seed_everything, split_batch

__all__ = [
    "Trainer", "TrainConfig", "TrainingStopped", "add_train_arguments", "engine_options", "make_train_config",
    "train_config_from_args",
    "check_run_state", "checkpoint_dir", "seed_everything", "split_batch",
]
