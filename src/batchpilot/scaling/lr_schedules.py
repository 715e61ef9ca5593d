"""LR schedules as pure functions of the optimizer step (in the style of optax).

Each function maps a step to a multiplier of the peak LR; wrap one in
:class:`torch.optim.lr_scheduler.LambdaLR` with :func:`make_scheduler`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from batchpilot.errors import BatchpilotError

SCHEDULES: tuple[str, ...] = ("constant", "cosine")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup (Goyal et al. 2017): ``(step + 1) / warmup_steps`` for the first steps, then 1."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """The LR multiplier at optimizer ``step`` (0-based).

    Args:
        step: optimizer steps taken so far.
        schedule: ``constant`` or ``cosine`` (Loshchilov & Hutter 2017, without restarts).
        warmup_steps: length of the linear warmup.
        total_steps: steps in the run; the cosine decays from the end of warmup to here.
        min_ratio: the cosine's floor as a fraction of the peak.
    """
    w = warmup_factor(step, warmup_steps)
    if schedule == "constant":
        return w
    if schedule == "cosine":
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
        return w * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    raise BatchpilotError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, schedule: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor`; step it once per *optimizer* step, never per micro-batch."""
    if schedule not in SCHEDULES:
        raise BatchpilotError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    fn: Callable[[int], float] = functools.partial(
        lr_factor, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
