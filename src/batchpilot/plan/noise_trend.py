"""The noise scale where it matters: its trend against the loss, read off at the target.

The gradient noise scale grows as the loss falls (McCandlish et al. 2018, fig. 5); Kaplan et al.
(2020, eq. 1.4) fit the critical batch as a power law in the loss, ``B_crit(L) = B_* / L^{1/α_B}``.
A short probe sees only the start of a run, while most of a run's samples are spent near its
end, so the planner fits ``log B = a + s·log L`` to the probe's phases and evaluates it at the
loss where the target is reached. That loss is itself read off the probe: the validation loss
when the target metric was first met, or, when the probe stopped short, extrapolated from the
metric's trend against the loss. Everything here is pure: lists of numbers in, numbers out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from batchpilot.workloads.spec import Target

MAX_SLOPE = 0.0
"""The fitted slope d log B / d log L is clipped to <= 0: the noise scale does not fall as the loss falls."""
MIN_SLOPE = -6.0
"""...and to >= -6 (Kaplan et al. 2020 fit 1/α_B ≈ 4.8 for language models; steeper is noise)."""
MAX_GROWTH = 2.0
"""An extrapolated noise scale is capped at 2x the largest measured one. A power law fitted over the short
stretch of loss a probe covers has an uncertain slope, and the loss at the target may itself be
extrapolated: on the bench's tabular SGD workload the fit (slope -3.9 over losses 1.33 to 1.0) read 6,237
at an extrapolated target loss of 0.65, where the sweep's B_crit was about 1,800 and the largest
measured B_simple 1,060 (bench/plan_accuracy.py, docs/planning.md)."""


@dataclass(frozen=True)
class NoiseTrend:
    """``log B = intercept + slope · log L`` fitted to ``(loss, b_noise)`` points.

    Attributes:
        slope: d log B / d log L (clipped to [MIN_SLOPE, MAX_SLOPE]; negative: B grows as L falls).
        intercept: log B at L = 1.
        points: the ``(loss, b_noise)`` pairs fitted.
        max_measured: the largest measured B (extrapolations are capped at :data:`MAX_GROWTH` x this).
        clipped: whether the least-squares slope was outside the allowed range.
    """

    slope: float
    intercept: float
    points: tuple[tuple[float, float], ...]
    max_measured: float
    clipped: bool

    def at(self, loss: float) -> float:
        """B_noise predicted at ``loss`` (capped at :data:`MAX_GROWTH` x the largest measured)."""
        if not loss > 0:
            return MAX_GROWTH * self.max_measured
        return min(math.exp(self.intercept + self.slope * math.log(loss)), MAX_GROWTH * self.max_measured)

    def to_dict(self) -> dict:
        """Plain data."""
        return asdict(self)


def fit_noise_trend(points: Sequence[tuple[float, float]]) -> NoiseTrend | None:
    """Least-squares power law of B_noise against the loss, or ``None`` without two usable points.

    Args:
        points: ``(loss, b_noise)`` pairs; pairs with a non-positive or non-finite member are skipped.
    """
    usable = [(l, b) for l, b in points if l > 0 and b > 0 and math.isfinite(l) and math.isfinite(b)]
    if not usable:
        return None
    xs = [math.log(l) for l, _ in usable]
    ys = [math.log(b) for _, b in usable]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    raw = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if len(usable) >= 2 and sxx > 1e-12 else 0.0
    slope = min(MAX_SLOPE, max(MIN_SLOPE, raw))
    return NoiseTrend(slope=slope, intercept=my - slope * mx, points=tuple(usable),
                      max_measured=max(b for _, b in usable), clipped=len(usable) >= 2 and slope != raw)


def _is_loss_metric(name: str) -> bool:
    return "loss" in name.lower()


def _linear_root(xs: Sequence[float], ys: Sequence[float], y_target: float) -> tuple[float, float] | None:
    """Least-squares ``y = a + b x``; returns ``(x at y_target, b)`` or ``None`` when flat."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 1e-12:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if abs(b) < 1e-12:
        return None
    return mx + (y_target - my) / b, b


def _improves_with(target: Target, slope: float, along_falling_x: bool) -> bool:
    """Whether a metric with d metric / d x = ``slope`` moves toward the target as training goes on."""
    better_when_larger = target.op in (">=", ">")
    moving = -slope if along_falling_x else slope
    return moving > 0 if better_when_larger else moving < 0


@dataclass(frozen=True)
class TargetLoss:
    """The validation loss at which the target is met, and how it was obtained.

    Attributes:
        loss: the loss (``nan`` when unknown).
        source: ``target_is_loss``, ``reached`` (measured in the probe), ``extrapolated`` (from the
            metric's trend against log loss over the probe's later evaluations) or ``last`` (no usable
            trend: the probe's last loss, a lower bound on how far the run goes).
        extrapolation: last probe loss / target loss (1 when measured).
    """

    loss: float
    source: str
    extrapolation: float


def loss_at_target(evals: Sequence[tuple[float, float]], target: Target | None) -> TargetLoss:
    """Where the run meets its target, in validation loss.

    Args:
        evals: ``(val_loss, metric)`` at each evaluation of the probe, in order.
        target: the workload's target (``None``: the probe's last loss).
    """
    evals = [(l, m) for l, m in evals if l > 0 and math.isfinite(l) and math.isfinite(m)]
    if not evals:
        return TargetLoss(float("nan"), "last", 1.0)
    last = evals[-1][0]
    if target is None:
        return TargetLoss(last, "last", 1.0)
    if _is_loss_metric(target.metric):
        return TargetLoss(target.value, "target_is_loss", max(1.0, last / target.value) if target.value > 0 else 1.0)
    for l, m in evals:
        if target.reached(m):
            return TargetLoss(l, "reached", 1.0)
    later = evals[len(evals) // 2:] if len(evals) >= 6 else evals
    fit = _linear_root([math.log(l) for l, _ in later], [m for _, m in later], target.value)
    if fit is None or not _improves_with(target, fit[1], along_falling_x=True):
        return TargetLoss(last, "last", 1.0)
    loss = min(last, math.exp(min(fit[0], math.log(last))))
    loss = max(loss, last / 100.0)  # never more than 100x below anything seen
    return TargetLoss(loss, "extrapolated", last / loss)


def samples_to_target(evals: Sequence[tuple[int, float]], target: Target | None,
                      max_factor: float = 100.0) -> tuple[float | None, float]:
    """Samples the probe's batch needs to meet ``target``: measured, or extrapolated.

    Fits the metric against log(samples) over the later half of the evaluations (the slow end of
    a learning curve is close to log-linear) and solves for the target.

    Returns:
        ``(samples, extrapolation)`` with ``extrapolation = samples / samples probed`` (1 when
        measured); ``(None, nan)`` when the trend does not move toward the target or would need
        more than ``max_factor`` times the samples probed.
    """
    evals = [(s, m) for s, m in evals if s > 0 and math.isfinite(m)]
    if target is None or not evals:
        return None, float("nan")
    for s, m in evals:
        if target.reached(m):
            return float(s), 1.0
    probed = evals[-1][0]
    later = evals[len(evals) // 2:] if len(evals) >= 6 else evals
    fit = _linear_root([math.log(s) for s, _ in later], [m for _, m in later], target.value)
    if fit is None or not _improves_with(target, fit[1], along_falling_x=False):
        return None, float("nan")
    if fit[0] > math.log(max_factor * probed):  # (compared in logs: exp() of a far root overflows)
        return None, float("nan")
    samples = math.exp(fit[0])
    samples = max(samples, float(probed))
    return samples, samples / probed
