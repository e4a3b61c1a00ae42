"""The training loop every fromscratch model shares.

The engine knows nothing about any model. A *task* supplies the model-specific parts:

    task.model                      the nn.Module to train
    task.model_config               a dataclass with to_dict(), saved as model_config.json
    task.global_batch(step)         the whole global batch of optimizer step `step` (1-based), a
                                    dict of tensors with the batch on dim 0 and a pure function
                                    of (seed, step): the data position is the step itself
    task.loss(model, batch)         (sum of per-token losses, number of tokens) on a micro-batch
    task.evaluate(model, step)      {"val_loss": ..., ...}, called every `eval_every` steps
    task.save_artifacts(run_dir)    tokenizer files etc., once at the start of a run (optional)
    task.flops_per_token()          for model FLOPs utilisation (optional)
    task.best_metric, best_mode     which evaluate() key picks the best checkpoint
                                    (default "val_loss", "min")
    task.fsdp_modules()             sub-modules to shard one by one under --fsdp (optional)
    task.model_name                 which model the run belongs to ("llama", ...), recorded in
                                    run.json so that a run is never resumed or loaded as another
    task.after_step(model, dist)    called after each optimizer step (optional; e.g. the MoE's
                                    bias balancing)
    task.step_metrics(dist)         extra columns for this step's row of metrics.csv, a dict of
                                    floats with the same keys every step (optional; called on
                                    every process after each step, so it may all-reduce; e.g.
                                    the MoE's load per expert)

Why the loss is a *sum*: the global batch is split over P processes and A accumulation steps.
Each micro-batch's summed loss is back-propagated, the token count is all-reduced, and the
gradients are divided by it, so the update equals that of one process on the whole batch,
whatever P and A are (DDP averages gradients over processes, hence the extra factor P).
"""

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import fromscratch
from fromscratch.checkpoints.runs import check_run_model
from fromscratch.checkpoints.safe import read_json_object
from fromscratch.devices import describe_device, resolve_device
from fromscratch.engine import checkpoint as ckpt
from fromscratch.engine.config import TrainConfig
from fromscratch.engine.distributed import all_reduce_sum, barrier, init_distributed, shutdown
from fromscratch.engine.metrics import CSVLog, TensorBoard, device_peak_flops
from fromscratch.engine.schedules import clock_cooldown_window, cooldown_window, learning_rate
from fromscratch.errors import Interrupted, UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingStopped(UserError):
    """The run cannot go on (a NaN loss, say); the last good checkpoint is left in place."""


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def split_batch(batch: dict, n: int) -> list[dict]:
    """Split a global batch along dim 0 into `n` consecutive micro-batches."""
    rows = next(v.size(0) for v in batch.values() if isinstance(v, torch.Tensor))
    if rows < n:
        raise UserError(
            f"a global batch of {rows} rows cannot be split into {n} micro-batches "
            "(processes × --grad-accum): raise --batch-size or lower --grad-accum"
        )
    parts = {k: torch.tensor_split(v, n) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return [{k: (parts[k][i] if k in parts else v) for k, v in batch.items()} for i in range(n)]



def check_run_state(run_dir: str | Path, resume: bool, model_name: str) -> None:
    """--resume needs a checkpoint of this model in `run_dir`, and a new run an `--out` without
    one. The Trainer checks it; a model's `train` calls it too, to fail before loading data."""
    latest = ckpt.read_index(Path(run_dir)).get("latest")
    if resume and not latest:
        raise UserError(f"--resume: {run_dir} holds no checkpoint to resume from; drop --resume to start a new run")
    if not resume and latest:
        raise UserError(f"{run_dir} already holds a run (checkpoint {latest}); "
                        "pass --resume to continue it, or choose another --out")
    if resume:
        check_run_model(Path(run_dir), model_name)


def switch_dropout(model: torch.nn.Module, on: bool) -> None:
    """Late dropout (Liu et al. 2023, `--dropout-from`): every dropout layer of `model` off or on,
    the rest of the model left in training mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.train(on)


class Trainer:
    def __init__(self, task, config: TrainConfig, command: list[str] | None = None):
        self.task, self.config = task, config
        self.command = list(command if command is not None else sys.argv)
        self.run_dir = Path(config.out_dir)
        self.best_metric = getattr(task, "best_metric", "val_loss")
        self.best_mode = getattr(task, "best_mode", "min")
        self.model_name = getattr(task, "model_name", type(task).__name__)
        # Everything that can be wrong with the arguments fails here, before any work starts.
        config.check_before_work()
        device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = init_distributed(device.type)
        self.device = device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        chunks = self.dist.world_size * config.grad_accum
        if config.batch_size % chunks:
            raise UserError(
                f"--batch-size {config.batch_size} is not divisible by processes × --grad-accum = "
                f"{self.dist.world_size} × {config.grad_accum}; the global batch must split evenly"
            )
        if config.fsdp and not self.dist.enabled:
            raise UserError("--fsdp shards the model over several processes: launch with torchrun --nproc_per_node N")
        self._check_run_dir()
        self._stop_signal: int | None = None
        self._last_plot = -math.inf
        self._cooldown = cooldown_window(config)  # (start step, steps), or None (none, or not yet decided)

    # --- run directory ---------------------------------------------------------------------

    def _check_run_dir(self) -> None:
        check_run_state(self.run_dir, self.config.resume, self.model_name)
        if self.config.resume:
            record = read_json_object(self.run_dir / ckpt.RUN_RECORD)
            problems = [
                f"{key}={record['model_config'].get(key)!r} (asked now: {value!r})"
                for key, value in self.task.model_config.to_dict().items()
                if record["model_config"].get(key) != value
            ]
            problems += [
                f"{key}={record['train_config'].get(key)!r} (asked now: {value!r})"
                for key, value in self.config.to_dict().items()
                if key not in self.config.RESUMABLE_CHANGES and record["train_config"].get(key) != value
            ]
            if problems:
                raise UserError(
                    f"--resume: the run in {self.run_dir} was started with "
                    + "; ".join(problems)
                    + f". Repeat the original flags (recorded in {self.run_dir / 'run.json'}) or use a new --out"
                )

    def _write_run_record(self) -> None:
        path = self.run_dir / "run.json"
        # The hardware with each start and resume: a run's speed depends on the machine it ran on.
        entry = {"command": self.command, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "hardware": describe_device(self.device)}
        if self.config.resume and path.exists():
            record = json.loads(path.read_text())
            record.setdefault("resumes", []).append(entry)
        else:
            record = {
                "model": self.model_name,
                **entry,
                "task": type(self.task).__name__,
                "model_config": self.task.model_config.to_dict(),
                "train_config": self.config.to_dict(),
                "world_size": self.dist.world_size,
                "device": str(self.device),
                "versions": {"fromscratch": fromscratch.__version__, "torch": torch.__version__},
            }
        ckpt.write_json(path, record)
        ckpt.write_json(self.run_dir / ckpt.MODEL_CONFIG, self.task.model_config.to_dict())

    # --- model, optimizer ------------------------------------------------------------------

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.dist.enabled and self.config.fsdp:
            from torch.distributed.fsdp import fully_shard

            for module in getattr(self.task, "fsdp_modules", lambda: [])():
                fully_shard(module)
            fully_shard(model)
            wrapped = model
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=ids)
        else:
            wrapped = model
        return torch.compile(wrapped) if self.config.compile else wrapped

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # PyTorch's fused AdamW (one kernel for all parameters, CPU and CUDA) computes the same
        # update as the default per-tensor loop, several times faster on many small tensors
        # (an MoE's experts). Not under FSDP, whose sharded parameters it does not take.
        fused = not self.config.fsdp and all(p.device.type in ("cpu", "cuda") for p in model.parameters())
        return torch.optim.AdamW(groups, lr=self.config.lr, betas=self.config.betas, eps=self.config.eps,
                                 fused=fused)

    # --- checkpoints -----------------------------------------------------------------------

    def _save(self, step, tokens_seen, best, is_best, model, optimizer, scaler) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)  # collective
        if self.dist.is_main:
            ckpt.prepare_checkpoint(self.run_dir, step)
        barrier(self.dist)  # the temporary directory exists; every process adds its RNG state
        tmp = ckpt.temporary_dir(self.run_dir, step)
        rng_json, rng_tensors = ckpt.capture_rng()
        ckpt.save_tensors(rng_tensors, tmp / f"rng-rank{self.dist.rank}.safetensors", metadata={"state": json.dumps(rng_json)})
        barrier(self.dist)
        if self.dist.is_main:
            optim_tensors, optim_rest = ckpt.flatten_optimizer_state(optim_state)
            trainer_state = {
                "step": step,
                "tokens_seen": tokens_seen,
                "best": best,
                "world_size": self.dist.world_size,
                "optimizer": optim_rest,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "cooldown": list(self._cooldown) if self._cooldown else None,
            }
            ckpt.seal_checkpoint(
                self.run_dir, step, tmp, model_state, optim_tensors, trainer_state, is_best, self.config.keep_last
            )
            if time.perf_counter() - self._last_plot > 60:  # drawing takes a second or so
                self._plot()
        barrier(self.dist)

    def _load(self, model, optimizer, scaler) -> tuple[int, int, dict | None]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        directory = ckpt.checkpoint_dir(self.run_dir, "latest")
        state = json.loads((directory / "trainer_state.json").read_text())
        model_state = ckpt.load_model_weights(directory / ckpt.MODEL_FILE)
        optim_state = ckpt.unflatten_optimizer_state(
            ckpt.load_tensors(directory / "optimizer.safetensors"), state["optimizer"]
        )
        set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
        # A parameter that never had a gradient (a part the run's data never reaches: the VLM's
        # image pooler without captions) has no AdamW state to save, so none to load: not strict.
        set_optimizer_state_dict(model, optimizer, optim_state,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rng_file = directory / f"rng-rank{self.dist.rank}.safetensors"
        if rng_file.exists():
            from safetensors import safe_open

            with safe_open(str(rng_file), framework="pt") as f:
                rng_json = json.loads(f.metadata()["state"])
            ckpt.restore_rng(rng_json, ckpt.load_tensors(rng_file))
        elif self.dist.is_main:
            print(f"note: {directory} has no RNG state for rank {self.dist.rank} (different process count); "
                  "the resumed run is valid but not bit-identical", file=sys.stderr)
        # One decided on the clock is kept; one planned from --max-steps follows it (`check_resumed_cooldown`).
        if state.get("cooldown") and self.config.max_minutes is not None:
            self._cooldown = tuple(state["cooldown"])
        return state["step"], state["tokens_seen"], state.get("best")

    def _plot(self) -> None:
        try:
            from fromscratch.engine.plot import plot_runs

            plot_runs([self.run_dir], self.run_dir / "loss.png")
        except ImportError:  # matplotlib is optional
            pass
        self._last_plot = time.perf_counter()

    # --- the loop --------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _clock_cooldown(self, step: int, steps_run: int, elapsed: float) -> tuple[int, int] | None:
        """The cooldown window once its share of --max-minutes is left (`clock_cooldown_window`);
        every process takes the main one's, so that all change the rate at the same step."""
        window = clock_cooldown_window(step, steps_run, elapsed, self.config)
        if not self.dist.enabled:
            return window
        shared = torch.tensor(window or (0, 0), dtype=torch.float64, device=self.device)
        if not self.dist.is_main:
            shared.zero_()
        start, steps = (int(v) for v in all_reduce_sum(shared, self.dist).tolist())
        return (start, steps) if steps else None

    def _evaluate(self, model, step: int) -> dict[str, float]:
        # Evaluation must not move the training RNG streams, or resumed runs would diverge.
        rng_json, rng_tensors = ckpt.capture_rng()
        model.eval()
        try:
            with torch.no_grad(), self._autocast():
                return {k: float(v) for k, v in self.task.evaluate(model, step).items()}
        finally:
            model.train()
            ckpt.restore_rng(rng_json, rng_tensors)

    def _autocast(self):
        dtype = DTYPES[self.config.dtype]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def fit(self) -> dict:
        """Train to `max_steps` (or until stopped); returns the last metrics and where things are."""
        cfg, info = self.config, self.dist
        model = self.task.model.to(self.device)
        if cfg.dropout_from and not any(isinstance(m, torch.nn.Dropout) for m in model.modules()):
            raise UserError(f"--dropout-from {cfg.dropout_from}: the {self.model_name} model has no "
                            "dropout layers (nn.Dropout) to switch")
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.run_dir)
            self._write_run_record()
            if hasattr(self.task, "save_artifacts"):
                self.task.save_artifacts(self.run_dir)
        train_model = self._wrap(model)
        optimizer = self._optimizer(model)
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.dtype == "float16")
        if cfg.resume:
            step0, tokens_seen, best = self._load(model, optimizer, scaler)
        else:
            step0, tokens_seen, best = 0, 0, None
            torch.manual_seed(cfg.seed + info.rank)  # each process its own dropout stream
        log = CSVLog(self.run_dir / "metrics.csv") if info.is_main else None
        eval_log = CSVLog(self.run_dir / "eval.csv") if info.is_main else None
        board = TensorBoard(self.run_dir) if info.is_main else None
        if log and cfg.resume:
            log.truncate_after(step0)
            eval_log.truncate_after(step0)
        flops_per_token = getattr(self.task, "flops_per_token", lambda: None)()
        peak = device_peak_flops(self.device, cfg.peak_flops)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        quiet = not info.is_main or bool(os.environ.get("TQDM_DISABLE"))
        progress = tqdm(total=cfg.max_steps, initial=step0, disable=quiet, desc="train", dynamic_ncols=True)
        is_ddp = info.enabled and not cfg.fsdp
        chunks = info.world_size * cfg.grad_accum
        last, evals, step = {}, {}, step0
        try:
            timer = started = time.perf_counter()
            for step in range(step0 + 1, cfg.max_steps + 1):
                lr = learning_rate(step, cfg, self._cooldown)
                if cfg.dropout_from and step <= cfg.dropout_from + 1:  # (evaluation puts the model back in training mode)
                    switch_dropout(model, on=step > cfg.dropout_from)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                micro_batches = split_batch(self.task.global_batch(step), chunks)
                mine = micro_batches[info.rank * cfg.grad_accum : (info.rank + 1) * cfg.grad_accum]
                loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
                n_tokens = torch.zeros((), dtype=torch.float64, device=self.device)
                for i, micro in enumerate(mine):
                    micro = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in micro.items()}
                    sync = train_model.no_sync() if is_ddp and i < len(mine) - 1 else nullcontext()
                    with sync:
                        with self._autocast():
                            micro_loss, micro_tokens = self.task.loss(train_model, micro)
                        scaler.scale(micro_loss.float()).backward()
                    loss_sum += micro_loss.detach().double()
                    n_tokens += micro_tokens
                totals = all_reduce_sum(torch.stack([loss_sum, n_tokens]), info)
                global_tokens = int(totals[1].item())
                loss = (totals[0] / max(global_tokens, 1)).item()
                scaler.unscale_(optimizer)
                factor = info.world_size / max(global_tokens, 1)
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(factor)
                max_norm = cfg.clip_grad if cfg.clip_grad > 0 else math.inf
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
                bad = not math.isfinite(loss) or (not scaler.is_enabled() and not math.isfinite(grad_norm))
                if bad and cfg.on_nan == "stop":
                    latest = ckpt.checkpoint_dir(self.run_dir, "latest")
                    where = f"the last good checkpoint, {latest}, is untouched" if latest else "no checkpoint was written yet"
                    raise TrainingStopped(
                        f"loss became {loss} (gradient norm {grad_norm}) at step {step}: training stopped; "
                        f"{where}. Lower --lr and --resume, or pass --on-nan skip to drop such steps"
                    )
                if bad:
                    optimizer.zero_grad(set_to_none=True)
                    if info.is_main:
                        progress.write(f"step {step}: loss {loss}, update skipped (--on-nan skip)")
                else:
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    if hasattr(self.task, "after_step"):
                        self.task.after_step(model, info)
                tokens_seen += global_tokens
                now = time.perf_counter()
                tokens_per_sec = global_tokens / max(now - timer, 1e-9)
                timer = now
                mfu = flops_per_token * tokens_per_sec / (peak * info.world_size) if flops_per_token and peak else float("nan")
                last = {
                    "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                    "tokens_per_sec": tokens_per_sec, "mfu": mfu, "skipped": int(bad),
                }
                if hasattr(self.task, "step_metrics"):
                    last.update(self.task.step_metrics(info))
                if info.is_main:
                    log.write(last)
                    board.write(last, step, "train")
                    progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
                    progress.update(1)

                elapsed = time.perf_counter() - started
                out_of_time = cfg.max_minutes is not None and elapsed > 60 * cfg.max_minutes
                if cfg.max_minutes is not None and self._cooldown is None:
                    self._cooldown = self._clock_cooldown(step, step - step0, elapsed)
                # A cooldown on the clock ends the run at its last step, when its rate is lowest.
                cooled_down = cfg.max_minutes is not None and self._cooldown is not None and step >= sum(self._cooldown)
                out_of_time |= cooled_down
                if info.enabled:  # every process must agree to stop at the same step
                    out_of_time = bool(all_reduce_sum(torch.tensor(float(out_of_time), device=self.device), info).item())
                stopping = self._stop_signal is not None or out_of_time
                is_best = False
                # A run that ends on the clock is evaluated at its last step too, so that its best
                # checkpoint can be the last one. (A signal asks to stop soon: no evaluation then.)
                if step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time:
                    evals = {"step": step, **self._evaluate(model, step)}
                    value = evals.get(self.best_metric)
                    if value is not None and math.isfinite(value):
                        better = best is None or (value < best["value"] if self.best_mode == "min" else value > best["value"])
                        if better:
                            best, is_best = {"value": value, "step": step, "metric": self.best_metric}, True
                    if info.is_main:
                        eval_log.write(evals)
                        board.write(evals, step, "eval")
                        progress.write("step {}: {}".format(step, ", ".join(f"{k} {v:.4g}" for k, v in evals.items() if k != "step")))
                if step % cfg.save_every == 0 or step == cfg.max_steps or is_best or stopping:
                    self._save(step, tokens_seen, best, is_best, model, optimizer, scaler)
                    timer = time.perf_counter()  # saving is not training time
                if stopping:
                    if info.is_main and cooled_down and self._stop_signal is None:
                        progress.write(f"the --cooldown of --max-minutes {cfg.max_minutes} ended at step {step}: "
                                       "training is done; checkpoint saved")
                    elif info.is_main:
                        why = f"signal {self._stop_signal}" if self._stop_signal else f"--max-minutes {cfg.max_minutes}"
                        progress.write(f"stopped by {why} at step {step}; checkpoint saved. "
                                       "Continue with the same command and --resume")
                    break
        finally:
            progress.close()
            if info.is_main and step > step0:
                self._plot()
            for s, handler in old_handlers.items():
                signal.signal(s, handler)
            if board:
                board.close()
            shutdown(info)
        if self._stop_signal is not None:
            raise Interrupted(self._stop_signal, f"stopped by signal {self._stop_signal} at step {step}; "
                                                 f"checkpoint saved in {self.run_dir}")
        return {"step": step, "train": last, "eval": evals, "best": best, "run_dir": str(self.run_dir)}
