"""The result of a training run: plain data, rendered elsewhere."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

STATUSES = ("completed", "target_reached", "diverged", "interrupted", "stopped")


@dataclass(frozen=True)
class TrainResult:
    """Summary of one run. ``wall_s`` and ``time_to_target_s`` count training time, not evaluation.

    With a variable batch (``batch_mode`` not ``fixed``), ``global_batch`` is the reference batch of
    the LR and ``batch_sizes`` lists the batches actually used.
    """

    status: str
    workload: str
    steps: int
    global_batch: int
    micro_batch_per_rank: int
    accumulation_steps: int
    world_size: int
    lr: float
    lr_rule: str
    warmup_steps: int
    schedule: str
    final_train_loss: float
    metric_name: str
    val_metric: float
    val_loss: float
    samples: int
    samples_per_s: float
    wall_s: float
    target: str | None = None
    steps_to_target: int | None = None
    samples_to_target: int | None = None
    time_to_target_s: float | None = None
    out_dir: str | None = None
    optimizer: str = "default"
    batch_mode: str = "fixed"
    batch_sizes: tuple[tuple[int, int], ...] = ()
    """``(step, batch)`` pairs: the 1-based optimizer step from which each global batch was used."""
    amp: str | None = None
    """Autocast type of the forward and the loss (``bfloat16``), or ``None``: fp32."""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.global_batch != self.micro_batch_per_rank * self.accumulation_steps * self.world_size:
            raise ValueError("global_batch must equal micro_batch_per_rank x accumulation_steps x world_size")

    def to_dict(self) -> dict:
        """JSON-ready dict; non-finite floats become ``None``."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}
