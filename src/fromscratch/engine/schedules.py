"""Learning-rate schedules as pure functions of the step.

A pure function needs no state in the checkpoint: the step alone fixes the learning rate, which
is one reason a resumed run can be bit-for-bit the uninterrupted one.
"""

import math

from fromscratch.engine.config import TrainConfig


def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate for optimizer step `step` (1-based)."""
    step = max(step, 1)
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
