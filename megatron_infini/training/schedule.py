"""Learning-rate schedule: linear warm-up, then cosine decay to min_lr (or constant).

Every parameter group keeps its own peak (`group["peak_lr"]`: the gates have their own);
the schedule scales all of them by the same factor, min_lr included proportionally.
"""

from __future__ import annotations

import math

from .config import OptimizerConfig


def lr_factor(step: int, opt: OptimizerConfig, total_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if opt.warmup_steps and step < opt.warmup_steps:
        return (step + 1) / opt.warmup_steps
    if opt.schedule == "constant":
        return 1.0
    decay = opt.decay_steps if opt.decay_steps is not None else max(total_steps - opt.warmup_steps, 1)
    progress = min((step - opt.warmup_steps) / max(decay, 1), 1.0)
    floor = opt.min_lr / opt.lr if opt.lr > 0 else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer, step: int, opt: OptimizerConfig, total_steps: int) -> float:
    """Set every group's lr for this step; return the main (non-gate) learning rate."""
    factor = lr_factor(step, opt, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = group.get("peak_lr", opt.lr) * factor
    return opt.lr * factor
