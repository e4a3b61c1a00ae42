"""Learning-rate schedules as pure functions of the step.

A pure function needs no state in the checkpoint: the step alone fixes the learning rate, which
is one reason a resumed run can be bit-for-bit the uninterrupted one. The one exception is a
cooldown on the clock (`--cooldown` with `--max-minutes`): the step it starts at and its length
are decided once, when that share of the time is left, and kept in the checkpoint.
"""

import math

from fromscratch.engine.config import TrainConfig


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
