"""The part of a ``batchpilot plan`` that a training framework must apply, validated.

A plan (``plan.json`` written by ``batchpilot plan``, the same data as a dict, or a plan object
with ``to_dict()`` or attributes) has many keys; the integrations need only the batch geometry,
the learning rate and the warmup. :func:`load_plan` reads those and checks the one identity that
every framework must respect (seed 002, pattern 3)::

    global_batch = micro_batch_per_rank x accumulation_steps x world_size
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from batchpilot.errors import BatchpilotError, require_positive_int

_OPTIONAL = ("lr_rule", "base_batch", "base_lr", "noise_scale")


@dataclass(frozen=True)
class PlanSettings:
    """What an integration applies from a plan.

    Attributes:
        micro_batch_per_rank: samples per forward/backward on one device.
        accumulation_steps: micro-batches per optimizer step.
        world_size: data-parallel ranks.
        global_batch: samples per optimizer step over all ranks and micro-batches.
        lr: peak learning rate at ``global_batch``.
        warmup_steps: linear warmup length in optimizer steps.
        lr_rule: the scaling rule the plan used (``linear``, ``sqrt``, ``none``), if given.
        base_batch: the batch the base LR was tuned at, if given.
        base_lr: the tuned base LR, if given.
        noise_scale: the measured gradient noise scale B_noise, if given.
    """

    micro_batch_per_rank: int
    accumulation_steps: int
    world_size: int
    global_batch: int
    lr: float
    warmup_steps: int = 0
    lr_rule: str | None = None
    base_batch: int | None = None
    base_lr: float | None = None
    noise_scale: float | None = None

    def __post_init__(self) -> None:
        for name in ("micro_batch_per_rank", "accumulation_steps", "world_size", "global_batch"):
            require_positive_int(f"plan {name}", getattr(self, name))
        product = self.micro_batch_per_rank * self.accumulation_steps * self.world_size
        if product != self.global_batch:
            raise BatchpilotError(
                f"plan global_batch {self.global_batch} != micro_batch_per_rank {self.micro_batch_per_rank} x "
                f"accumulation_steps {self.accumulation_steps} x world_size {self.world_size} = {product}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr) and self.lr > 0):
            raise BatchpilotError(f"plan lr must be a finite number > 0, got {self.lr!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise BatchpilotError(f"plan warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")

    def doctor_fields(self) -> dict[str, Any]:
        """What the plan adds to a live :func:`batchpilot.doctor.check` (``None`` left out).

        Only what live objects cannot show: the base point, the rule, the noise scale, and the
        plan's global batch (the doctor checks it against the loader x accumulation x world).
        The warmup and LR are read off the live optimizer and scheduler instead.
        """
        out: dict[str, Any] = {"global_batch": self.global_batch, "batch_source": "plan"}
        out.update({k: getattr(self, k) for k in _OPTIONAL if getattr(self, k) is not None})
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return asdict(self)


def _as_mapping(plan: Any) -> Mapping[str, Any]:
    if isinstance(plan, PlanSettings):
        return plan.to_dict()
    if isinstance(plan, Mapping):
        return plan
    if isinstance(plan, (str, Path)):
        from batchpilot.plan.result import read_plan

        return read_plan(plan)
    to_dict = getattr(plan, "to_dict", None)
    if callable(to_dict):
        data = to_dict()
        if isinstance(data, Mapping):
            return data
    fields = ("micro_batch_per_rank", "accumulation_steps", "world_size", "global_batch", "lr", "warmup_steps", *_OPTIONAL)
    if all(hasattr(plan, f) for f in fields[:5]):
        return {f: getattr(plan, f) for f in fields if hasattr(plan, f)}
    raise BatchpilotError(
        f"a plan must be a dict, a path to plan.json or a plan object, got {type(plan).__name__}")


def load_plan(plan: Any) -> PlanSettings:
    """Read the settings an integration applies from a plan.

    Args:
        plan: a :class:`PlanSettings`, a mapping with the keys of ``plan.json``, a path to
            ``plan.json``, or an object with ``to_dict()`` or the same attributes.

    Returns:
        The validated settings. ``global_batch`` may be left out (it is derived); when it is
        given it must equal ``micro_batch_per_rank x accumulation_steps x world_size``.

    Raises:
        BatchpilotError: a missing or malformed key, or batch numbers that do not multiply out.
    """
    if isinstance(plan, PlanSettings):
        return plan
    data = _as_mapping(plan)
    missing = [k for k in ("micro_batch_per_rank", "accumulation_steps", "lr") if data.get(k) is None]
    if missing:
        raise BatchpilotError(f"plan is missing {', '.join(missing)} (expected the keys of plan.json)")
    world = data.get("world_size", 1)
    world = 1 if world is None else world
    m, k = data["micro_batch_per_rank"], data["accumulation_steps"]
    ints_ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (m, k, world))
    derived = m * k * world if ints_ok else None
    global_batch = data.get("global_batch")
    warmup = data.get("warmup_steps")
    return PlanSettings(
        micro_batch_per_rank=m, accumulation_steps=k, world_size=world,
        global_batch=derived if global_batch is None else global_batch,
        lr=data["lr"], warmup_steps=0 if warmup is None else warmup,
        **{key: data.get(key) for key in _OPTIONAL},
    )
