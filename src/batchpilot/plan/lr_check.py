"""Check the base LR before scaling from it: a few short runs at the base batch.

Every LR in a plan is scaled from the workload's base (batch, LR). If that LR is far from the
best one, every scaled LR inherits the error, and the measured trade-off between batch and
steps is distorted: a too-small base LR makes small batches look slow and moves the apparent
critical batch up (Shallue et al. 2019 tune the LR at every batch for this reason). The check
trains the base batch from the same initialisation and data order at a few multiples of the
base LR for a bounded number of steps, and scores each by its mean training loss over the last
third of the run. Short runs favour large LRs (Wu et al. 2018, "short-horizon bias"), so the
check is conservative: it moves only when the gain is clear, and among the multipliers within
the tolerance of the best it takes the smallest.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Sequence

from batchpilot.errors import BatchpilotError
from batchpilot.workloads import Workload

MULTIPLIERS: tuple[float, ...] = (1 / 3, 1.0, 3.0, 9.0)
"""A factor-3 grid: four short runs find a base LR that is off by 3x or more (1/3 below, 9x above)."""
TOLERANCE = 0.15
"""A multiplier must lower the late loss by more than 15% to replace the base LR. Short runs favour large
LRs: on the bench's tabular SGD workload, 3x the base LR lowered the loss after 100 steps by 11% but then
failed to reach the target at all (bench/plan_accuracy.py), while mnist1d-cnn's 9x gain was 27%."""


@dataclass(frozen=True)
class LRCheck:
    """What the LR check measured and decided.

    Attributes:
        base_lr: the workload's base LR.
        multipliers: the multiples of ``base_lr`` tried.
        late_losses: the mean training loss over the last third of each run (``inf`` if it diverged).
        steps: optimizer steps per run, at the base batch.
        chosen_multiplier: the multiplier adopted (1 when the base LR stands).
        wall_s: the check's wall-clock time.
        note: one sentence for the plan.
    """

    base_lr: float
    multipliers: tuple[float, ...]
    late_losses: tuple[float, ...]
    steps: int
    chosen_multiplier: float
    wall_s: float
    note: str

    def __post_init__(self) -> None:
        if len(self.multipliers) != len(self.late_losses):
            raise BatchpilotError("one late loss per multiplier")

    @property
    def adopted_lr(self) -> float:
        """The base LR the plan scales from."""
        return self.base_lr * self.chosen_multiplier

    def to_dict(self) -> dict:
        """Plain data (with the adopted LR)."""
        return {**asdict(self), "adopted_lr": self.adopted_lr}


def decide(multipliers: Sequence[float], late_losses: Sequence[float], tolerance: float = TOLERANCE) -> float:
    """The multiplier to adopt: 1 unless another lowers the late loss by more than ``tolerance``;
    then the smallest multiplier within ``tolerance`` of the best (short runs favour large LRs).

    Raises:
        BatchpilotError: no multiplier 1 among ``multipliers``, or every run diverged.
    """
    if 1.0 not in multipliers:
        raise BatchpilotError(f"the LR check needs multiplier 1 among {list(multipliers)}")
    finite = [(m, l) for m, l in zip(multipliers, late_losses) if math.isfinite(l)]
    if not finite:
        raise BatchpilotError("every LR-check run diverged, the base LR among them: lower the workload's base LR")
    best = min(l for _, l in finite)
    base = dict(zip(multipliers, late_losses))[1.0]
    if math.isfinite(base) and base <= best * (1 + tolerance) + 1e-12:
        return 1.0
    return min(m for m, l in finite if l <= best * (1 + tolerance) + 1e-12)


def _note(check_multipliers: Sequence[float], chosen: float, base_lr: float) -> str:
    if chosen == 1.0:
        others = ", ".join(f"{m:.3g}x" for m in check_multipliers if m != 1.0)
        return f"base LR {base_lr:g} checked against {others}: kept"
    edge = " (the largest tried: the best may be higher)" if chosen == max(check_multipliers) else ""
    return (f"base LR {base_lr:g} is off: {chosen:.3g}x ({base_lr * chosen:.3g}) lowered the loss of a short run at the "
            f"base batch by more than {TOLERANCE:.0%}{edge}; the plan scales from {base_lr * chosen:.3g}")


def check_base_lr(workload: Workload, *, steps: int, multipliers: Sequence[float] = MULTIPLIERS, seed: int = 0,
                  time_budget_s: float | None = None) -> LRCheck:
    """Train the base batch for ``steps`` at each multiple of the base LR and decide.

    Args:
        workload: what to train (fresh models; the caller's RNG is restored by the trainer's fork).
        steps: optimizer steps per run.
        multipliers: multiples of the base LR (must include 1).
        seed: one seed for every run: same initialisation, same data order.
        time_budget_s: stop trying further multipliers (largest first are skipped last) when spent.
    """
    from batchpilot.train import TrainConfig, Trainer

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 3:
        raise BatchpilotError(f"the LR check needs at least 3 steps per run, got {steps!r}")
    start = time.perf_counter()
    order = sorted(multipliers, key=lambda m: abs(math.log(m)))  # 1 first, then outwards
    losses: dict[float, float] = {}
    for m in order:
        if time_budget_s is not None and losses and time.perf_counter() - start > time_budget_s:
            break
        trace: list[float] = []
        config = TrainConfig(global_batch=workload.base_batch, lr=workload.base_lr * m, steps=steps, seed=seed,
                             eval_every=None, stop_at_target=False)
        result = Trainer(workload, config, on_step=lambda r: trace.append(r["loss"])).run()
        if result.status == "interrupted":
            raise KeyboardInterrupt
        late = trace[len(trace) - max(1, len(trace) // 3):]
        ok = result.status != "diverged" and late and all(math.isfinite(x) for x in late)
        losses[m] = sum(late) / len(late) if ok else math.inf
    tried = tuple(sorted(losses))
    late_losses = tuple(losses[m] for m in tried)
    chosen = decide(tried, late_losses)
    return LRCheck(base_lr=workload.base_lr, multipliers=tried, late_losses=late_losses, steps=steps,
                   chosen_multiplier=chosen, wall_s=time.perf_counter() - start,
                   note=_note(tried, chosen, workload.base_lr))


def with_checked_lr(workload: Workload, check: LRCheck) -> Workload:
    """The workload with its base LR replaced by the adopted one (a copy; the original is untouched)."""
    return workload if check.chosen_multiplier == 1.0 else replace(workload, base_lr=check.adopted_lr)
