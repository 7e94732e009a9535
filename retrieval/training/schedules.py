"""Learning-rate schedules as pure functions of the optimizer step."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(
    step: int, total_steps: int, warmup_steps: int, min_factor: float
) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based).

    Linear warm-up from ``1 / (warmup_steps + 1)`` to 1 over ``warmup_steps`` steps, then cosine
    decay to ``min_factor`` at ``total_steps``; stays at ``min_factor`` afterwards.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    min_factor: float = 0.01,
) -> LambdaLR:
    """Cosine schedule with linear warm-up over ``warmup_fraction`` of ``total_steps``; stepped
    after every optimizer step."""
    warmup = int(round(warmup_fraction * total_steps))
    return LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, total_steps, warmup, min_factor))
