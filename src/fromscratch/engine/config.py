"""The training engine's settings, and the command-line flags every `train` sub-command shares."""

import argparse
import math
import os
from dataclasses import asdict, dataclass, field, fields

from fromscratch.errors import UserError
from fromscratch.inputs import checked_output_dir

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "noam", "constant")


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    max_steps: int = 1000
    batch_size: int = 32  # the GLOBAL batch: split over processes and accumulation steps
    grad_accum: int = 1
    lr: float = 3e-4  # peak learning rate (for "noam": a multiplier on d_model^-0.5 · ...)
    min_lr: float = 0.0  # the floor of the cosine schedule
    warmup_steps: int = 100
    schedule: str = "cosine"
    cooldown: float = 0.0  # share of the run at its end over which the rate falls linearly to ~0
    noam_d_model: int = 512  # d_model in the paper's schedule (§5.3)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0  # AdamW decay, applied to matrices only (not norms, not biases)
    dropout_from: int = 0  # late dropout: the model's dropout layers stay off until after this step
    clip_grad: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 200
    save_every: int = 200
    keep_last: int = 2  # how many recent checkpoints to keep (the best is always kept too)
    seed: int = 0
    dtype: str = "float32"
    compile: bool = False
    fsdp: bool = False
    on_nan: str = "stop"  # "stop": stop with a message; "skip": drop that step's update
    peak_flops: float | None = None  # per device; None = look the device up in the table
    device: str = "auto"
    resume: bool = False
    max_minutes: float | None = None  # stop (and save) once this much wall time has passed
    # Settings that may change between a run and its resumption without breaking exactness.
    RESUMABLE_CHANGES: tuple = field(
        default=("max_steps", "eval_every", "save_every", "keep_last", "on_nan", "compile",
                 "peak_flops", "device", "resume", "out_dir", "max_minutes"),
        repr=False,
    )

    def __post_init__(self):
        self._check_types()
        self.betas = tuple(self.betas)
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.on_nan not in ("stop", "skip"):
            raise UserError(f"--on-nan {self.on_nan!r}: choose 'stop' or 'skip'")
        if self.dropout_from < 0:
            raise UserError(f"--dropout-from must be a step ≥ 0, got {self.dropout_from}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every", "keep_last"):
            if getattr(self, name) < 1:
                raise UserError(f"--{flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise UserError(f"--warmup-steps must be ≥ 0, got {self.warmup_steps}")
        # NaN fails every comparison, so `not x > 0` also refuses it.
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        for name in ("min_lr", "weight_decay", "clip_grad"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"--{flag(name)} must be a number ≥ 0, got {value}")
        if not (math.isfinite(self.cooldown) and 0 <= self.cooldown < 1):
            raise UserError(f"--cooldown must be a share of the run in [0, 1), got {self.cooldown}")
        for name in ("max_minutes", "peak_flops"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UserError(f"--{flag(name)} must be a positive number, got {value}")
        if not (math.isfinite(self.eps) and self.eps > 0) or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"Adam needs eps > 0 and betas in [0, 1), got eps={self.eps}, betas={self.betas}")
        if self.min_lr > self.lr:
            raise UserError(f"--min-lr {self.min_lr} is above --lr {self.lr}: the cosine schedule would rise")

    def _check_types(self) -> None:
        """Each setting of the type its default has (an int where steps are counted, a bool for a
        switch), so that a 2.5 or a "10" from Python fails here, not deep in a run already started."""
        number = (int, float)
        for f in fields(self):
            value, default = getattr(self, f.name), f.default
            if f.name == "RESUMABLE_CHANGES":
                continue
            if f.name == "betas":
                ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
                    isinstance(b, number) and not isinstance(b, bool) for b in value)
                kind = "two numbers"
            elif isinstance(default, bool):
                ok, kind = isinstance(value, bool), "True or False"
            elif isinstance(default, int):
                ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
            elif isinstance(default, float) or default is None:
                ok = (value is None and default is None) or (isinstance(value, number) and not isinstance(value, bool))
                kind = "a number" + (" or None" if default is None else "")
            else:
                ok, kind = isinstance(value, str), "a string"
            if not ok:
                raise UserError(f"{f.name} must be {kind}, got {value!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("RESUMABLE_CHANGES")
        d["betas"] = list(self.betas)
        return d

    def check_before_work(self) -> None:
        """Fail now, before any work, if the run directory cannot be made and written, the device
        does not exist here, or a resumed cooldown cannot follow a new --max-steps."""
        from fromscratch.devices import resolve_device
        from fromscratch.engine.schedules import check_resumed_cooldown

        checked_output_dir(self.out_dir, "--out")  # not a file, nor under one, and writable
        resolve_device(self.device)
        check_resumed_cooldown(self)


def flag(name: str) -> str:
    return name.replace("_", "-")


def add_train_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig | None = None) -> None:
    """The flags every `fromscratch <model> train` shares; `defaults` gives the model's own defaults."""
    d = defaults or TrainConfig()
    g = parser.add_argument_group("training engine")
    g.add_argument("--out", required=True, help="run directory (checkpoints, metrics, plots)")
    g.add_argument("--max-steps", type=int, default=d.max_steps)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--cooldown", type=float, default=d.cooldown, metavar="SHARE",
                   help="let the learning rate fall linearly to ~0 over this last share of the run (of "
                        "--max-steps, or of --max-minutes: then decided on the clock); 0 = off")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--dropout-from", type=int, default=d.dropout_from, metavar="STEP",
                   help="late dropout (Liu et al. 2023): the model's dropout stays off for the first STEP "
                        "steps and is on after them; 0 = on from the start")
    g.add_argument("--clip-grad", type=float, default=d.clip_grad)
    g.add_argument("--eval-every", type=int, default=d.eval_every)
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint interval in steps")
    g.add_argument("--keep-last", type=int, default=d.keep_last)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--dtype", choices=DTYPES, default=d.dtype)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--fsdp", action="store_true", help="shard the model with FSDP (under torchrun)")
    g.add_argument("--on-nan", choices=("stop", "skip"), default=d.on_nan)
    g.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s, for MFU")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    g.add_argument("--max-minutes", type=float, default=None, help="stop and save after this much wall time")


def make_train_config(defaults: TrainConfig, out: str | os.PathLike, **options) -> TrainConfig:
    """`defaults` with the engine options given (None: keep the default) and `out` as the run
    directory; every value checked (UserError for an unknown option or an impossible value)."""
    base = defaults.to_dict()
    unknown = sorted(set(options) - set(base))
    if unknown:
        raise UserError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(base))}")
    base.update({name: value for name, value in options.items() if value is not None})
    base["out_dir"] = str(out)
    return TrainConfig(**base)


def engine_options(args: argparse.Namespace) -> dict:
    """The engine's options among parsed command-line flags (`add_train_arguments`)."""
    names = {f.name for f in fields(TrainConfig)} - {"out_dir", "RESUMABLE_CHANGES"}
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def train_config_from_args(args: argparse.Namespace, defaults: TrainConfig | None = None) -> TrainConfig:
    """Merge the parsed shared flags into the model's default TrainConfig."""
    return make_train_config(defaults or TrainConfig(), args.out, **engine_options(args))
