"""Pick the batch driver a run asks for: a batch-size schedule, the adaptive controller, or none.

Kept apart from :mod:`batchpilot.train.batching` (the driver base) and
:mod:`batchpilot.train.adaptive` (which builds on it), so neither imports the other in a circle.
"""

from __future__ import annotations

from batchpilot.errors import BatchpilotError
from batchpilot.scaling.batch_schedules import BatchSchedule
from batchpilot.train.adaptive import AdaptiveDriver
from batchpilot.train.batching import BatchDriver, ScheduleDriver, sample_budget


def make_batch_driver(config, workload, rule: str) -> BatchDriver | None:
    """The driver a :class:`~batchpilot.train.TrainConfig` asks for, or ``None`` for a fixed batch.

    Args:
        config: the run's config (``batch_schedule``, ``adaptive``, ``max_batch``, ``min_batch`` ...).
        workload: the workload (its training-set size bounds every batch).
        rule: LR scaling rule for batch changes.
    """
    n = workload.num_train
    common = dict(ref_batch=config.global_batch, rule=rule, num_samples=n,
                  budget_samples=sample_budget(config.steps, config.epochs, config.global_batch, n),
                  schedule=config.schedule, warmup_steps=config.warmup_steps, micro_cap=config.micro_batch_per_rank)
    if config.batch_schedule:
        spec = BatchSchedule.parse(config.batch_schedule)
        if spec.end > n:
            raise BatchpilotError(f"batch schedule end {spec.end} is larger than the training set ({n} samples)")
        return ScheduleDriver(spec, **common)
    if config.adaptive:
        max_batch = config.max_batch or min(16 * config.global_batch, n // 2)
        if max_batch > n:
            raise BatchpilotError(f"max batch {max_batch} is larger than the training set ({n} samples)")
        return AdaptiveDriver(max_batch=max(max_batch, config.global_batch), min_batch=getattr(config, "min_batch", None),
                              estimator=getattr(config, "adaptive_estimator", "micro-batch"),
                              throughput=getattr(config, "adaptive_throughput", "steps"),
                              noise_window=getattr(config, "adaptive_noise_window", 8), **common)
    return None
