"""Batch-size schedules as pure functions of the step or the epoch (in the style of optax).

* :func:`linear_ramp`, :func:`exponential_ramp`, :func:`step_ramp`: grow the batch from ``start``
  to ``end``. The LR follows the batch by the run's scaling rule (linear for SGD, square root for
  the Adam family; :mod:`batchpilot.scaling.lr_rules`), so each step stays on the rule's curve.
* :func:`smith_schedule`: Smith, Kindermans, Ying & Le 2018 (ICLR), "Don't Decay the Learning Rate,
  Increase the Batch Size". Where a step-decay schedule would divide the LR by ``factor`` at a
  milestone, multiply the batch by ``factor`` instead and keep the LR. The SGD noise scale
  ``g = ε (N/B − 1) ≈ ε N / B`` (their eq. 1) then falls by the same factor as under the decay. Once
  the batch would pass ``end``, the rest of the factor is taken as an LR decay (their "hybrid").

:class:`BatchSchedule` is the validated spec behind ``batchpilot train --batch-schedule``::

    linear:start=32,end=512,over=200           # steps (the default unit)
    exp:start=32,end=512,over=2,unit=epoch
    step:start=32,factor=2,every=50,end=512
    smith:start=32,factor=5,milestones=2/4/6,end=800,unit=epoch

``start`` defaults to the run's ``--batch``. Every function here is pure: the batch at a given
(step, epoch) never depends on history, so a resumed run sees the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchpilot.errors import BatchpilotError

KINDS: tuple[str, ...] = ("linear", "exp", "step", "smith")
UNITS: tuple[str, ...] = ("step", "epoch")


def _check_range(start: int, end: int) -> None:
    if start < 1 or end < start:
        raise BatchpilotError(f"batch schedule needs 1 <= start <= end, got start {start}, end {end}")


def linear_ramp(t: float, *, start: int, end: int, duration: float) -> int:
    """Batch at time ``t``: linear from ``start`` (t=0) to ``end`` (t >= ``duration``), rounded."""
    _check_range(start, end)
    if duration <= 0 or t >= duration:
        return end
    return round(start + (end - start) * max(t, 0.0) / duration)


def exponential_ramp(t: float, *, start: int, end: int, duration: float) -> int:
    """Batch at time ``t``: geometric from ``start`` to ``end`` over ``duration``, rounded."""
    _check_range(start, end)
    if duration <= 0 or t >= duration:
        return end
    return round(start * (end / start) ** (max(t, 0.0) / duration))


def step_ramp(t: float, *, start: int, factor: float, every: float, end: int) -> int:
    """Batch at time ``t``: ``start · factor^floor(t / every)``, capped at ``end``."""
    _check_range(start, end)
    if factor < 1 or every <= 0:
        raise BatchpilotError(f"step ramp needs factor >= 1 and every > 0, got factor {factor}, every {every}")
    jumps = math.floor(max(t, 0.0) / every)
    return min(end, round(start * factor ** min(jumps, 64)))


def smith_schedule(t: float, *, start: int, end: int, factor: float, milestones: tuple[float, ...]) -> tuple[int, float]:
    """(batch, LR multiplier) at time ``t`` under "increase the batch instead of decaying the LR".

    At each milestone passed, the batch grows by ``factor`` while it stays <= ``end``; the part of
    the factor that does not fit becomes an LR decay, so batch / LR always falls by ``factor``
    per milestone (Smith et al. 2018). The LR multiplier is relative to the run's peak LR.
    """
    _check_range(start, end)
    if factor <= 1:
        raise BatchpilotError(f"smith schedule needs factor > 1, got {factor}")
    batch, lr_mult = float(start), 1.0
    for m in milestones:
        if t < m:
            break
        grow = min(factor, end / batch)
        batch *= grow
        lr_mult /= factor / grow
    return min(end, round(batch)), lr_mult


@dataclass(frozen=True)
class BatchSchedule:
    """A batch-size schedule (see the module docstring for the text form).

    Attributes:
        kind: ``linear``, ``exp``, ``step`` or ``smith``.
        end: the largest batch.
        start: the first batch; ``None`` means the run's ``--batch``.
        over: ramp length (``linear``, ``exp``) in ``unit``.
        every: interval between jumps (``step``) in ``unit``.
        factor: jump factor (``step``, ``smith``).
        milestones: times of the jumps (``smith``) in ``unit``.
        unit: ``step`` (optimizer steps) or ``epoch`` (fractional passes over the data).
    """

    kind: str
    end: int
    start: int | None = None
    over: float = 0.0
    every: float = 0.0
    factor: float = 2.0
    milestones: tuple[float, ...] = ()
    unit: str = "step"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BatchpilotError(f"batch schedule kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.unit not in UNITS:
            raise BatchpilotError(f"batch schedule unit must be step or epoch, got {self.unit!r}")
        if isinstance(self.end, bool) or not isinstance(self.end, int) or self.end < 1:
            raise BatchpilotError(f"batch schedule end must be a positive integer, got {self.end!r}")
        if self.start is not None:
            _check_range(self.start, self.end)
        if self.kind in ("linear", "exp") and not self.over > 0:
            raise BatchpilotError(f"{self.kind} batch schedule needs over > 0 (the ramp length), got {self.over!r}")
        if self.kind == "step" and not (self.every > 0 and self.factor >= 1):
            raise BatchpilotError(f"step batch schedule needs every > 0 and factor >= 1, got every {self.every}, factor {self.factor}")
        if self.kind == "smith":
            if not self.factor > 1 or not self.milestones:
                raise BatchpilotError("smith batch schedule needs factor > 1 and milestones, e.g. milestones=2/4/6")
            if list(self.milestones) != sorted(self.milestones) or self.milestones[0] < 0:
                raise BatchpilotError(f"smith milestones must be increasing and >= 0, got {self.milestones}")

    def at(self, step: int, epoch: float, default_start: int) -> tuple[int, float | None]:
        """The batch for optimizer ``step`` (0-based) at fractional ``epoch``, and an LR multiplier.

        The multiplier is ``None`` for the ramps (the LR follows the run's scaling rule) and a number
        for ``smith`` (the LR is held, then decayed, relative to the run's peak).
        """
        t = float(step) if self.unit == "step" else float(epoch)
        start = self.start if self.start is not None else min(default_start, self.end)
        if self.kind == "linear":
            return linear_ramp(t, start=start, end=self.end, duration=self.over), None
        if self.kind == "exp":
            return exponential_ramp(t, start=start, end=self.end, duration=self.over), None
        if self.kind == "step":
            return step_ramp(t, start=start, factor=self.factor, every=self.every, end=self.end), None
        return smith_schedule(t, start=start, end=self.end, factor=self.factor, milestones=self.milestones)

    @classmethod
    def parse(cls, text: str) -> "BatchSchedule":
        """Parse ``kind:key=value,...`` (see the module docstring)."""
        kind, _, rest = text.strip().partition(":")
        if kind not in KINDS:
            raise BatchpilotError(f"batch schedule must look like 'linear:start=32,end=512,over=200' (kinds: {', '.join(KINDS)}), got {text!r}")
        fields: dict = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, sep, value = item.partition("=")
            try:
                if not sep:
                    raise ValueError
                if key in ("start", "end"):
                    fields[key] = int(value)
                elif key in ("over", "every", "factor"):
                    fields[key] = float(value)
                elif key == "milestones":
                    fields[key] = tuple(float(v) for v in value.split("/"))
                elif key == "unit":
                    fields[key] = value
                else:
                    raise BatchpilotError(f"unknown batch schedule key {key!r} in {text!r} (keys: start, end, over, every, factor, milestones, unit)")
            except ValueError as exc:
                if isinstance(exc, BatchpilotError):
                    raise
                raise BatchpilotError(f"batch schedule item {item!r} in {text!r} must be key=number") from None
        if "end" not in fields:
            raise BatchpilotError(f"batch schedule {text!r} needs end=<largest batch>")
        return cls(kind=kind, **fields)

    def __str__(self) -> str:
        parts = [f"start={self.start}"] if self.start is not None else []
        parts.append(f"end={self.end}")
        if self.kind in ("linear", "exp"):
            parts.append(f"over={self.over:g}")
        if self.kind == "step":
            parts += [f"factor={self.factor:g}", f"every={self.every:g}"]
        if self.kind == "smith":
            parts += [f"factor={self.factor:g}", "milestones=" + "/".join(f"{m:g}" for m in self.milestones)]
        parts.append(f"unit={self.unit}")
        return f"{self.kind}:{','.join(parts)}"
