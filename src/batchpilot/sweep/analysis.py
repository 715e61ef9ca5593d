"""What a sweep's trials say: steps-to-target against batch, its scaling regimes, the
generalization gap, sharpness, and how the plan's choice compares. Pure functions of the
trial results (plain dicts as :func:`batchpilot.sweep.runner.run_trial` returns them).

* **Fit** (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", eq. 2.11):
  ``S = S_min (1 + B_crit / B)`` for steps and ``E = E_min (1 + B / B_crit)`` for examples,
  with ``E_min = S_min · B_crit``. ``S`` is linear in ``1/B``; the fit is least squares on
  *relative* residuals, so small and large batches weigh alike.
* **Regimes** (Shallue et al. 2019, "Measuring the Effects of Data Parallelism"): between
  two swept batches, the local slope ``-Δlog S / Δlog B`` is 1 under perfect scaling
  (doubling the batch halves the steps), between 0 and 1 under diminishing returns, and
  about 0 where a larger batch gains nothing (maximal data parallelism).
* **Gap rule** (the seeds' "if accuracy drops > 2%, reduce the batch or add
  regularization"): flag every batch whose validation metric is more than ``threshold``
  below the best batch's. Remedies are *hypotheses* to test with another sweep; none is
  applied, and the seeds' ``weight_decay ∝ √batch``-style rules are not evidence
  (seeds/README.md, error 9).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import fmean, pstdev
from typing import Any, Sequence

import numpy as np

PERFECT_SLOPE = 0.8
NO_GAIN_SLOPE = 0.1


@dataclass(frozen=True)
class BatchSummary:
    """One batch size, at its best LR multiplier (fewest mean steps to target; Shallue et al. 2019)."""

    batch: int
    lr_multiplier: float
    lr: float
    seeds: int
    reached: int
    diverged: int
    steps_to_target: float | None
    examples_to_target: float | None
    time_to_target_s: float | None
    median_time_to_target_s: float | None
    val_metric: float | None
    val_metric_std: float | None
    best_val_metric: float | None
    train_metric: float | None
    generalization_gap: float | None
    top_eigenvalue: float | None
    hessian_trace: float | None
    samples_per_s: float | None


@dataclass(frozen=True)
class ScalingFit:
    """``S = S_min (1 + B_crit/B)``; ``E_min = S_min · B_crit``; ``rel_rmse`` of the steps fit."""

    s_min: float
    b_crit: float
    e_min: float
    rel_rmse: float
    points: int

    def steps(self, batch: float) -> float:
        """Predicted steps to target at ``batch``."""
        return self.s_min * (1 + self.b_crit / batch)

    def examples(self, batch: float) -> float:
        """Predicted examples to target at ``batch``."""
        return self.e_min * (1 + batch / self.b_crit)


@dataclass(frozen=True)
class Regime:
    """The scaling between two neighbouring batches."""

    batch_low: int
    batch_high: int
    slope: float
    regime: str  # perfect | diminishing | no_gain


@dataclass(frozen=True)
class GapFlag:
    """A batch whose validation metric trails the best by more than the threshold, with hypotheses to test."""

    batch: int
    val_metric: float
    drop: float
    overfitting: bool
    hypotheses: tuple[str, ...]


@dataclass(frozen=True)
class PlanComparison:
    """The plan's trial against the best fixed batch of the grid."""

    global_batch: int
    reached: bool
    time_to_target_s: float | None
    steps_to_target: int | None
    best_batch: int | None
    best_time_to_target_s: float | None
    time_ratio: float | None
    noise_scale: float | None
    note: str = ""
    time_basis: str = "measured"


@dataclass(frozen=True)
class SweepAnalysis:
    """Everything the report and the JSON show."""

    metric_name: str
    higher_is_better: bool
    target: str | None
    batches: tuple[BatchSummary, ...]
    fit: ScalingFit | None
    fit_note: str
    regimes: tuple[Regime, ...]
    best_batch_by_time: int | None
    best_batch_by_steps: int | None
    best_val_batch: int | None
    gap_threshold: float
    gap_flags: tuple[GapFlag, ...]
    plan: PlanComparison | None
    notes: tuple[str, ...] = field(default_factory=tuple)
    time_basis: str = "measured"

    def to_dict(self) -> dict:
        """Plain data."""
        return asdict(self)


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return fmean(vals) if vals else None


def summarize_batch(trials: Sequence[dict]) -> BatchSummary:
    """Summarize the trials of one batch: pick the LR multiplier whose seeds all reached the
    target in the fewest mean steps; if none did, the one with the best mean validation metric."""
    by_mult: dict[float, list[dict]] = {}
    for t in trials:
        by_mult.setdefault(t["lr_multiplier"], []).append(t)
    higher = trials[0]["higher_is_better"]

    def key(group: list[dict]) -> tuple:
        steps = [t["steps_to_target"] for t in group]
        all_reached = all(s is not None for s in steps)
        val = _mean([t["val_metric"] for t in group])
        val_key = -math.inf if val is None else (val if higher else -val)
        return (0, fmean(steps), -val_key) if all_reached else (1, math.inf, -val_key)

    best = min(by_mult.values(), key=key)
    vals = [t["val_metric"] for t in best if t["val_metric"] is not None]
    all_vals = [_mean([t["val_metric"] for t in g]) for g in by_mult.values()]
    all_vals = [v for v in all_vals if v is not None]
    reached = [t for t in best if t["steps_to_target"] is not None]
    full = len(reached) == len(best)
    sharp = [t["sharpness"] for t in best if t.get("sharpness")]
    return BatchSummary(
        batch=best[0]["batch"], lr_multiplier=best[0]["lr_multiplier"], lr=best[0]["lr"], seeds=len(best),
        reached=len(reached), diverged=sum(bool(t["diverged"]) for t in best),
        steps_to_target=fmean(t["steps_to_target"] for t in best) if full else None,
        examples_to_target=fmean(t["examples_to_target"] for t in best) if full else None,
        time_to_target_s=fmean(t["time_to_target_s"] for t in best) if full else None,
        median_time_to_target_s=_mean([t.get("median_time_to_target_s") for t in best]) if full else None,
        val_metric=fmean(vals) if vals else None, val_metric_std=pstdev(vals) if len(vals) > 1 else None,
        best_val_metric=(max(all_vals) if higher else min(all_vals)) if all_vals else None,
        train_metric=_mean([t["train_metric"] for t in best]),
        generalization_gap=_mean([t["generalization_gap"] for t in best]),
        top_eigenvalue=_mean([s.get("top_eigenvalue") for s in sharp]),
        hessian_trace=_mean([s.get("trace") for s in sharp]),
        samples_per_s=_mean([t["samples_per_s"] for t in best if not t["diverged"]]),
    )


def fit_scaling(batches: Sequence[float], steps: Sequence[float]) -> tuple[ScalingFit | None, str]:
    """Fit ``S = S_min (1 + B_crit/B)`` (McCandlish et al. 2018) by least squares on relative residuals.

    ``S = a + b/B`` with ``a = S_min`` and ``b = S_min · B_crit``; minimising ``Σ((a + b/B − S)/S)²``
    is linear in ``(a, b)``.

    Returns:
        The fit, or ``None`` and the reason (fewer than 3 points, or a non-positive parameter:
        ``b <= 0`` means no gain from larger batches anywhere in the range, ``a <= 0`` means
        perfect scaling throughout, so ``B_crit`` lies beyond the largest batch).
    """
    pts = [(float(b), float(s)) for b, s in zip(batches, steps) if s is not None and s > 0]
    if len(pts) < 3:
        return None, f"needs at least 3 batches that reached the target, got {len(pts)}"
    B = np.array([p[0] for p in pts])
    S = np.array([p[1] for p in pts])
    design = np.stack([1.0 / S, 1.0 / (B * S)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, np.ones_like(S), rcond=None)
    if b <= 0:
        return None, "steps to target do not fall with batch anywhere in the range (no gain: B_crit below the smallest batch)"
    if a <= 0:
        return None, f"steps fall in proportion to batch throughout (perfect scaling: B_crit above {int(B.max())})"
    rel = (a + b / B - S) / S
    return ScalingFit(s_min=float(a), b_crit=float(b / a), e_min=float(b), rel_rmse=float(np.sqrt(np.mean(rel**2))),
                      points=len(pts)), ""


def classify_regimes(batches: Sequence[int], steps: Sequence[float | None], *, perfect: float = PERFECT_SLOPE,
                     no_gain: float = NO_GAIN_SLOPE) -> list[Regime]:
    """The local scaling slope between neighbouring batches that both reached the target (Shallue et al. 2019)."""
    pts = sorted((b, s) for b, s in zip(batches, steps) if s is not None and s > 0)
    out = []
    for (b1, s1), (b2, s2) in zip(pts, pts[1:]):
        slope = -math.log(s2 / s1) / math.log(b2 / b1)
        kind = "perfect" if slope >= perfect else ("no_gain" if slope <= no_gain else "diminishing")
        out.append(Regime(b1, b2, slope, kind))
    return out


def gap_hypotheses(flag: BatchSummary, best: BatchSummary, drop: float, higher_is_better: bool,
                   tuned: bool) -> tuple[tuple[str, ...], bool]:
    """Hypotheses (never facts) for why ``flag`` validates worse than ``best``, each testable by a sweep.

    If the *train* metric fell by at least half as much as the validation metric, the batch
    under-fits (an optimization problem: LR or training length); otherwise the loss is in
    generalization, and regularization is worth testing.

    Returns:
        The hypotheses and whether the drop looks like over-fitting.
    """
    sign = 1.0 if higher_is_better else -1.0
    train_drop = None
    if flag.train_metric is not None and best.train_metric is not None:
        train_drop = sign * (best.train_metric - flag.train_metric)
    overfit = train_drop is not None and train_drop < 0.5 * drop
    h = []
    if not tuned:
        h.append(f"the LR is not tuned at batch {flag.batch}: test with --lr-multipliers 0.25,0.5,1,2 "
                 "(Shallue et al. 2019 tune it per batch)")
    if overfit:
        h += [f"more weight decay at batch {flag.batch} (e.g. 2x): sweep it ('weight_decay ∝ √batch' is a heuristic, not a result)",
              "dropout, or more of it: sweep a few rates",
              "label smoothing (e.g. 0.1): sweep it"]
    else:
        what = f"the train metric fell too ({train_drop:.3f})" if train_drop is not None else "no train metric"
        h.append(f"under-fitting, not over-fitting ({what}): an LR too high or too low for this batch, or too few steps "
                 "(a larger batch takes fewer steps per epoch: test more --max-epochs); regularization would not help")
    return tuple(h), overfit


def _noise_scale(plan: dict | None) -> float | None:
    if not plan:
        return None
    ns = plan.get("noise_scale")
    if isinstance(ns, dict):
        ns = next((ns[k] for k in ("b_simple", "b_noise", "value", "b_crit") if isinstance(ns.get(k), (int, float))), None)
    return float(ns) if isinstance(ns, (int, float)) and math.isfinite(ns) else None


TIME_BASES = {"measured": "time_to_target_s", "median_step": "median_time_to_target_s"}


def analyze(trials: Sequence[dict], *, plan: dict | None = None, gap_threshold: float = 0.02,
            time_basis: str = "measured") -> SweepAnalysis:
    """Analyze a sweep's trials (grid trials plus an optional ``tag == 'plan'`` trial).

    Args:
        trials: results of :func:`batchpilot.sweep.runner.run_trial`.
        plan: the plan JSON given to ``--plan`` (its ``global_batch`` is marked, its
            ``noise_scale`` is compared with the fitted ``B_crit``).
        gap_threshold: the gap rule's threshold in metric units (0.02 = 2 points of accuracy).
        time_basis: ``measured`` (the training wall time to the target) or ``median_step``
            (steps to target x the trial's median step time: robust to a busy machine's spikes).
    """
    if time_basis not in TIME_BASES:
        raise ValueError(f"time_basis must be one of {sorted(TIME_BASES)}, got {time_basis!r}")
    tkey = TIME_BASES[time_basis]
    if not trials:
        raise ValueError("no finished trials to analyze")
    grid = [t for t in trials if t.get("tag", "grid") == "grid"]
    plan_trials = [t for t in trials if t.get("tag") == "plan"]
    first = trials[0]
    higher = first["higher_is_better"]
    by_batch: dict[int, list[dict]] = {}
    for t in grid:
        by_batch.setdefault(t["batch"], []).append(t)
    rows = [summarize_batch(ts) for _, ts in sorted(by_batch.items())]
    tuned = len({t["lr_multiplier"] for t in grid}) > 1
    fit, fit_note = fit_scaling([r.batch for r in rows], [r.steps_to_target for r in rows])
    regimes = classify_regimes([r.batch for r in rows], [r.steps_to_target for r in rows])
    reached = [r for r in rows if getattr(r, tkey) is not None]
    best_time = min(reached, key=lambda r: getattr(r, tkey)).batch if reached else None
    best_steps = min(reached, key=lambda r: r.steps_to_target).batch if reached else None
    scored = [r for r in rows if r.best_val_metric is not None]
    best_val_row = (max if higher else min)(scored, key=lambda r: r.best_val_metric) if scored else None
    flags = []
    if best_val_row is not None:
        for r in scored:
            drop = (best_val_row.best_val_metric - r.best_val_metric) * (1 if higher else -1)
            if drop > gap_threshold:
                hyps, overfit = gap_hypotheses(r, best_val_row, drop, higher, tuned)
                flags.append(GapFlag(r.batch, r.best_val_metric, drop, overfit, hyps))
    notes = []
    if any(r.diverged for r in rows):
        notes.append("diverged trials: " + ", ".join(f"batch {r.batch} ({r.diverged}/{r.seeds})" for r in rows if r.diverged))
    comparison = _compare_plan(plan, plan_trials, rows, best_time, tkey, time_basis)
    if fit is not None and comparison is not None and comparison.noise_scale is not None:
        notes.append(f"fitted B_crit {fit.b_crit:.0f} vs the plan's measured noise scale {comparison.noise_scale:.0f} "
                     f"(McCandlish et al. 2018 expect B_crit ≈ B_noise)")
    return SweepAnalysis(metric_name=first["metric_name"], higher_is_better=higher, target=first.get("target"),
                         batches=tuple(rows), fit=fit, fit_note=fit_note, regimes=tuple(regimes),
                         best_batch_by_time=best_time, best_batch_by_steps=best_steps,
                         best_val_batch=best_val_row.batch if best_val_row else None, gap_threshold=gap_threshold,
                         gap_flags=tuple(flags), plan=comparison, notes=tuple(notes), time_basis=time_basis)


def _compare_plan(plan: dict | None, plan_trials: list[dict], rows: list[BatchSummary], best_time: int | None,
                  tkey: str, basis: str) -> PlanComparison | None:
    if plan is None:
        return None
    batch = int(plan["global_batch"])
    ns = _noise_scale(plan)
    best = next((r for r in rows if r.batch == best_time), None)
    best_t = getattr(best, tkey) if best else None
    if not plan_trials:
        return PlanComparison(batch, False, None, None, best_time, best_t, None, ns, "the plan's trial has not run", basis)
    times = [t.get(tkey) for t in plan_trials]
    if any(t is None for t in times):
        return PlanComparison(batch, False, None, None, best_time, best_t, None, ns,
                              "the plan's configuration did not reach the target", basis)
    t_plan = fmean(times)
    steps = round(fmean(t["steps_to_target"] for t in plan_trials))
    if best is None:
        return PlanComparison(batch, True, t_plan, steps, None, None, None, ns, "no grid batch reached the target", basis)
    return PlanComparison(batch, True, t_plan, steps, best.batch, best_t, t_plan / best_t, ns, "", basis)


def as_jsonable(obj: Any) -> Any:
    """Dataclasses and tuples to plain JSON-ready data (non-finite floats to ``None``)."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {k: as_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
