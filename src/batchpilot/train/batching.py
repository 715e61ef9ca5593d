"""Variable-batch training for the reference loop: which batch, micro-batch and LR each step uses.

A *batch driver* answers, before each optimizer step, the global batch, its micro-batch split and
the LR multiplier; after the step it may change its mind (the adaptive controller,
:mod:`batchpilot.train.adaptive`). The loop stays the same exact loop: each step is one global batch,
accumulated exactly and normalised by its unit count.

With a variable batch the length of a run is counted in **samples**: ``steps`` means "as many
samples as ``steps`` steps at the run's ``global_batch``" and ``epochs`` means ``epochs × N``
samples. The LR schedule (warmup, cosine) is a function of the samples seen, expressed in steps at
``global_batch`` (so ``warmup_steps`` keeps its meaning), and the batch moves the LR by the run's
scaling rule (or a schedule's own multiplier, or the AdaScale gain). The driver's state is in the
checkpoint, so a resumed run sees the same batches and LRs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from batchpilot.scaling.batch_schedules import BatchSchedule
from batchpilot.scaling.lr_rules import scale_lr
from batchpilot.scaling.lr_schedules import lr_factor


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step uses.

    Attributes:
        batch: samples in the global batch (the last step is cut to the run's sample budget).
        micro_batch: samples per micro-batch (the last micro-batch may be smaller).
        lr_scale: multiplier of the run's peak LR (schedule factor x batch multiplier).
        info: extra fields for the step's metrics record (e.g. the noise scale the LR used).
    """

    batch: int
    micro_batch: int
    lr_scale: float
    info: tuple[tuple[str, float], ...] = ()


def micro_batch_for(batch: int, cap: int | None, min_micro_batches: int = 1) -> int:
    """Micro-batch size for ``batch``: at most ``cap``, and at least ``min_micro_batches`` pieces."""
    pieces = max(min_micro_batches, math.ceil(batch / cap) if cap else 1)
    return max(1, math.ceil(batch / max(1, min(pieces, batch))))


class BatchDriver:
    """Base driver: the sample budget, the LR, the micro-batch policy and the change history.

    Subclasses implement :meth:`batch_at` and may override :meth:`after_step`.

    Args:
        ref_batch: the run's ``global_batch``; the peak LR belongs to it.
        rule: LR scaling rule for batch changes (``linear``, ``sqrt``, ``none``).
        num_samples: training-set size.
        budget_samples: samples in the run.
        schedule: LR schedule name (``constant``, ``cosine``).
        warmup_steps: warmup length in steps at ``ref_batch``.
        micro_cap: largest micro-batch (the run's ``micro_batch_per_rank``), ``None`` for no cap.
    """

    after_micro = None
    """A hook for the trainer's ``after_micro`` (``None``: none needed)."""

    def __init__(self, *, ref_batch: int, rule: str, num_samples: int, budget_samples: int, schedule: str,
                 warmup_steps: int, micro_cap: int | None) -> None:
        self.ref_batch, self.rule, self.num_samples = ref_batch, rule, num_samples
        self.budget_samples, self.schedule, self.warmup_steps = budget_samples, schedule, warmup_steps
        self.micro_cap = micro_cap
        self.changes: list[list[int]] = []
        """``[step, batch]`` pairs: the 1-based step from which each batch was used."""

    def bind(self, model_fn, workload, dtype, family: str) -> None:
        """Called once the trainer has built its model (the adaptive driver needs it)."""

    @property
    def total_ref_steps(self) -> float:
        """The run's length in steps at ``ref_batch`` (the LR schedule's horizon)."""
        return self.budget_samples / self.ref_batch

    def batch_at(self, step: int, samples: int) -> tuple[int, float | None]:
        """The batch for 0-based ``step`` after ``samples`` samples, and an LR multiplier or ``None``."""
        raise NotImplementedError

    def plan(self, step: int, samples: int) -> StepPlan:
        """The plan of 0-based ``step``; records a change of batch."""
        batch, mult = self.batch_at(step, samples)
        batch = max(1, min(batch, self.num_samples))
        if mult is None:
            mult = scale_lr(1.0, self.ref_batch, batch, self.rule)
        progress = samples / self.ref_batch
        factor = lr_factor(progress, schedule=self.schedule, warmup_steps=self.warmup_steps,  # type: ignore[arg-type]
                           total_steps=max(1, round(self.total_ref_steps)))
        if not self.changes or self.changes[-1][1] != batch:
            self.changes.append([step + 1, batch])
        run_batch = max(1, min(batch, self.budget_samples - samples))
        pieces = self.min_micro_batches(step)
        return StepPlan(run_batch, micro_batch_for(run_batch, self.micro_cap, pieces), factor * mult,
                        tuple(self.record_fields().items()))

    def min_micro_batches(self, step: int) -> int:
        """Fewest micro-batches for 0-based ``step`` (a noise monitor needs 2 on the steps it measures)."""
        return 1

    def before_accumulate(self) -> None:
        """Called once the step's batch is drawn and fetched, just before its first forward."""

    def record_fields(self) -> dict[str, float]:
        """Extra fields for the metrics record of the step being planned."""
        return {}

    def done(self, samples: int) -> bool:
        """Whether the sample budget is spent."""
        return samples >= self.budget_samples

    def after_step(self, step: int, batch: int) -> None:
        """Called after optimizer step ``step`` (1-based) that used ``batch`` samples."""

    def state_dict(self) -> dict:
        """State for a checkpoint (plain data)."""
        return {"changes": [list(c) for c in self.changes]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.changes = [[int(s), int(b)] for s, b in state["changes"]]


class ScheduleDriver(BatchDriver):
    """Follows a pure :class:`BatchSchedule`."""

    def __init__(self, schedule_spec: BatchSchedule, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec = schedule_spec

    def batch_at(self, step: int, samples: int) -> tuple[int, float | None]:
        return self.spec.at(step, samples / self.num_samples, self.ref_batch)


def sample_budget(steps: int | None, epochs: float | None, ref_batch: int, num_samples: int) -> int:
    """Samples in a variable-batch run: ``steps × ref_batch``, else ``epochs × N`` (1 epoch by default)."""
    if steps is not None:
        return steps * ref_batch
    return max(1, round((epochs or 1.0) * num_samples))
