"""Measure the critical batch directly: short runs at a few batches to a common loss.

McCandlish et al. (2018, eq. 2.11) model the samples a run needs to reach a given loss as
``E(B) = E_min (1 + B / B_crit)``: linear in B, with ``B_crit = E_min / slope``. Shallue et al.
(2019) and McCandlish et al. (fig. 7) fit it from runs trained to a fixed loss at several
batches. Here each run is short: it trains to the loss that the noise probe (the base batch)
reached, with the plan's own LR and warmup at that batch, and counts the samples it needed.
Two or three batches suffice for the two parameters. The probe's own run is the base-batch
point, so the confirmation costs the runs at the larger batches only.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from batchpilot.errors import BatchpilotError
from batchpilot.workloads import Workload


@dataclass(frozen=True)
class Confirmation:
    """What the confirmation runs measured.

    Attributes:
        loss_threshold: the validation loss every run trained to.
        batches: the global batches.
        samples: samples each needed to reach ``loss_threshold`` (``None``: not reached within its cap),
            the fewest over the LR multipliers tried.
        lr_multipliers: the multiple of the plan's LR that needed the fewest samples at each batch.
        b_crit: the fitted critical batch (``inf``: samples did not grow with the batch; ``nan``: no fit).
        e_min: the fitted E_min, in samples.
        wall_s: time of the runs trained here (not the base batch's, which is the probe).
    """

    loss_threshold: float
    batches: tuple[int, ...]
    samples: tuple[float | None, ...]
    lr_multipliers: tuple[float, ...]
    b_crit: float
    e_min: float
    wall_s: float

    def to_dict(self) -> dict:
        """Plain data."""
        return asdict(self)


def fit_critical_batch(batches: Sequence[float], samples: Sequence[float | None]) -> tuple[float, float]:
    """Fit ``E(B) = E_min (1 + B / B_crit)`` to the batches that reached the loss, on log samples.

    Relative (log) errors weigh every batch alike; a least-squares fit on raw samples would let the
    largest batch, whose count is the largest, decide alone. ``E_min`` has a closed form for each
    ``B_crit``; ``B_crit`` is searched on a fine geometric grid from 1/16 of the smallest batch to
    64x the largest, and ``inf`` (samples that do not grow with the batch) is a candidate too.
    (:func:`confirm_critical_batch` leaves out a batch that did not reach the loss when two others did;
    otherwise it enters at its cap: it needed more, so the fitted ``B_crit`` is then an upper bound.)

    Returns:
        ``(b_crit, e_min)``; ``(nan, nan)`` with fewer than two distinct batches.
    """
    pts = [(float(b), float(s)) for b, s in zip(batches, samples) if s is not None and s > 0 and b > 0]
    if len({b for b, _ in pts}) < 2:
        return float("nan"), float("nan")
    logs = [math.log(s) for _, s in pts]
    lo, hi = min(b for b, _ in pts) / 16, max(b for b, _ in pts) * 64
    grid = [lo * (hi / lo) ** (i / 400) for i in range(401)] + [math.inf]

    def sse(b_crit: float) -> tuple[float, float]:
        shifts = [math.log1p(b / b_crit) if math.isfinite(b_crit) else 0.0 for b, _ in pts]
        log_e_min = sum(l - s for l, s in zip(logs, shifts)) / len(pts)
        return sum((l - s - log_e_min) ** 2 for l, s in zip(logs, shifts)), math.exp(log_e_min)

    best = min(grid, key=lambda c: sse(c)[0])
    return best, sse(best)[1]


def samples_to_loss(workload: Workload, *, batch: int, lr: float, warmup_steps: int, loss_threshold: float,
                    max_samples: float, eval_every_samples: float, micro_batch: int | None = None,
                    seed: int = 0, max_time_s: float | None = None) -> float | None:
    """Train ``batch`` until the validation loss is at most ``loss_threshold``; the samples it took.

    Returns ``None`` when ``max_samples`` or ``max_time_s`` pass first (or the run diverges).
    """
    from batchpilot.train import TrainConfig, Trainer

    hit: dict[str, float] = {}
    start = time.perf_counter()

    class _Reached(Exception):
        pass

    class _OutOfTime(Exception):
        pass

    def on_step(record: dict) -> None:
        if "val_loss" in record and record["val_loss"] <= loss_threshold:
            hit["samples"] = record["samples"]
            raise _Reached
        if max_time_s is not None and time.perf_counter() - start > max_time_s:
            raise _OutOfTime

    steps = max(1, math.ceil(max_samples / batch))
    config = TrainConfig(global_batch=batch, micro_batch_per_rank=micro_batch, lr=lr, warmup_steps=min(warmup_steps, steps),
                         steps=steps, seed=seed, eval_every=max(1, round(eval_every_samples / batch)),
                         stop_at_target=False)
    try:
        result = Trainer(workload, config, on_step=on_step).run()
    except _Reached:
        return hit["samples"]
    except _OutOfTime:
        return None
    if result.status == "interrupted":
        raise KeyboardInterrupt
    return None


def confirm_critical_batch(workload: Workload, *, base_samples: float, loss_threshold: float, batches: Sequence[int],
                           lr_for: Callable[[int], float], warmup_for: Callable[[int], int],
                           micro_for: Callable[[int], int | None], max_factor: float = 16.0, seed: int = 0,
                           lr_multipliers: Sequence[float] = (1.0, 0.5),
                           time_budget_s: float | None = None) -> Confirmation:
    """Fit B_crit from the base batch's probe and short runs at ``batches``.

    Args:
        workload: what to train.
        base_samples: samples the probe (at the base batch) needed to reach ``loss_threshold``.
        loss_threshold: the common validation loss.
        batches: the larger global batches to run.
        lr_for, warmup_for, micro_for: the plan's LR, warmup and micro-batch at a batch.
        max_factor: each run stops after ``max_factor x base_samples`` samples (E(B)/E(B0) <= B/B0).
        lr_multipliers: multiples of ``lr_for(B)`` tried at each larger batch; the fewest samples count.
            B_crit assumes a well-tuned LR at every batch (McCandlish et al. 2018; Shallue et al. 2019), and
            a scaling rule tends to overshoot at large batches, so one step down is tried too.
        seed: the runs' seed (the probe's, so they start from the same initialisation).
        time_budget_s: skip the remaining batches once this much time has gone.
    """
    if not base_samples > 0 or not loss_threshold > 0:
        raise BatchpilotError(f"confirmation needs a positive base sample count and loss, got {base_samples}, "
                              f"{loss_threshold}")
    start = time.perf_counter()
    b0 = workload.base_batch
    done_batches: list[int] = [b0]
    done_samples: list[float | None] = [float(base_samples)]
    caps: list[float] = [float(base_samples)]
    multipliers: list[float] = [1.0]
    for batch in sorted(set(batches)):
        if batch <= b0:
            continue
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            break
        cap = min(max_factor, batch / b0) * base_samples * 1.25
        tried: dict[float, float | None] = {}
        for m in lr_multipliers:
            if tried and time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                break
            left = None if time_budget_s is None else max(1.0, time_budget_s - (time.perf_counter() - start))
            tried[m] = samples_to_loss(workload, batch=batch, lr=lr_for(batch) * m, warmup_steps=warmup_for(batch),
                                       loss_threshold=loss_threshold, max_samples=cap, micro_batch=micro_for(batch),
                                       eval_every_samples=max(batch, base_samples / 20), seed=seed, max_time_s=left)
        reached = {m: s for m, s in tried.items() if s is not None}
        m_best = min(reached, key=reached.get) if reached else next(iter(tried))
        done_batches.append(batch)
        done_samples.append(reached.get(m_best))
        multipliers.append(m_best)
        caps.append(cap)
    reached = [(b, s) for b, s in zip(done_batches, done_samples) if s is not None]
    if len(reached) >= 2:  # a batch that did not get there (cap, time) is reported, not guessed at
        b_crit, e_min = fit_critical_batch([b for b, _ in reached], [s for _, s in reached])
    else:  # only the base batch got there: the others enter at their caps, an upper bound on B_crit
        b_crit, e_min = fit_critical_batch(done_batches, [s if s is not None else c for s, c in zip(done_samples, caps)])
    return Confirmation(loss_threshold=loss_threshold, batches=tuple(done_batches), samples=tuple(done_samples),
                        lr_multipliers=tuple(multipliers),
                        b_crit=b_crit, e_min=e_min, wall_s=time.perf_counter() - start)
