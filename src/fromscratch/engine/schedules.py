"""Learning-rate schedules as pure functions of the step.

A pure function needs no state in the checkpoint: the step alone fixes the learning rate, which
is one reason a resumed run can be bit-for-bit the uninterrupted one. The one exception is a
cooldown on the clock (`--cooldown` with `--max-minutes`): the step it starts at and its length
are decided once, when that share of the time is left, and kept in the checkpoint.
"""

import math

from fromscratch.engine.config import TrainConfig
from fromscratch.errors import UserError


def learning_rate(step: int, config: TrainConfig, cooldown: tuple[int, int] | None = None) -> float:
    """The learning rate for optimizer step `step` (1-based). `cooldown` = (start, steps): after
    step `start` the schedule's rate is scaled down linearly, to 1/(steps + 1) of itself at step
    start + steps, the last (the warm-up–stable–decay shape of Hägele et al. 2024, on any schedule)."""
    base = scheduled_rate(max(step, 1), config)
    if cooldown is None or step <= cooldown[0]:
        return base
    start, steps = cooldown
    return base * max(1.0 - (step - start) / (steps + 1), 0.0)


def cooldown_window(config: TrainConfig) -> tuple[int, int] | None:
    """(start, steps) of the cooldown of a run bounded by steps: its last `cooldown` share. A run
    bounded by the clock (max_minutes) decides it while running (`clock_cooldown_window`)."""
    if not config.cooldown or config.max_minutes is not None:
        return None
    steps = max(round(config.cooldown * config.max_steps), 1)
    return config.max_steps - steps, steps


def check_resumed_cooldown(config: TrainConfig) -> None:
    """On --resume, a cooldown planned from --max-steps follows a new --max-steps, unless it had
    begun: its rate has then fallen toward 0 at the old last step, and the steps after that would
    train at 0. Refused here, before any work. (One decided on the clock is kept as it was.)"""
    from fromscratch.checkpoints.safe import read_json_object
    from fromscratch.engine.checkpoint import checkpoint_dir

    if not config.resume or config.max_minutes is not None:
        return
    directory = checkpoint_dir(config.out_dir, "latest")
    if directory is None or not (directory / "trainer_state.json").is_file():
        return  # nothing to resume: check_run_state says so
    state = read_json_object(directory / "trainer_state.json")
    recorded = tuple(state["cooldown"]) if state.get("cooldown") else None
    if recorded is None or recorded == cooldown_window(config) or state["step"] <= recorded[0]:
        return
    start, steps = recorded
    raise UserError(f"--max-steps {config.max_steps}: the run's cooldown began after step {start} (the last {steps} "
                    f"steps of {start + steps}) and was at step {state['step']}; its rate falls to 0 at step "
                    f"{start + steps}, so a different --max-steps cannot follow it. Resume with --max-steps "
                    f"{start + steps}, or start a new run")


def clock_cooldown_window(step: int, steps_run: int, elapsed: float, config: TrainConfig) -> tuple[int, int] | None:
    """The cooldown of a run bounded by max_minutes, once only its `cooldown` share of the time is
    left: it starts after `step` and lasts as many steps as the remaining time holds at the rate
    so far (`steps_run` steps in `elapsed` seconds). None while it is not yet time."""
    budget = 60 * config.max_minutes
    if not config.cooldown or elapsed < (1 - config.cooldown) * budget:
        return None
    return step, max(round(steps_run * (budget - elapsed) / max(elapsed, 1e-9)), 1)


def scheduled_rate(step: int, config: TrainConfig) -> float:
    """The rate of `config.schedule` (with its warm-up) at `step` ≥ 1."""
    warmup = max(config.warmup_steps, 1)
    if config.schedule == "noam":
        # Vaswani et al. §5.3: d_model^-0.5 · min(step^-0.5, step · warmup^-1.5), times a scale.
        return config.lr * config.noam_d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
    if step <= warmup:
        return config.lr * step / warmup
    if config.schedule == "constant":
        return config.lr
    # Cosine decay from lr to min_lr over the steps after warm-up.
    progress = min((step - warmup) / max(config.max_steps - warmup, 1), 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))
