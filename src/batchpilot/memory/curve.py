"""The memory curve M(B): peak training-step memory as a function of the micro-batch.

The step's live bytes at every moment are ``a_t + s_t * B`` (what exists at that moment,
plus what scales with the batch), so the peak ``M(B) = max_t (a_t + s_t * B)`` is convex
and piecewise linear in B: at small batches the peak sits where fixed memory dominates
(the optimizer step, the end of backward), at large batches where activations do.
Two consequences shape the fit:

* ``peak_bytes(B)`` interpolates linearly between traced batches. For a convex M the
  chord lies *above* the curve, so between traced points the prediction errs on the
  safe side, and it is exact at them. Beyond the largest traced batch it extends the
  last chord, whose slope is the asymptotic per-sample cost once activations dominate
  (hence the default ladder 1, 4, 16, ... extended until that slope settles: fake-tensor
  tracing costs the same at any B).
* ``fixed_bytes + per_sample_bytes * B`` is that large-batch asymptote (the line through
  the two largest traced batches); ``residual_frac`` is the worst relative distance of
  the traced peaks from it, i.e. how far from linear the small-batch end is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from batchpilot.errors import BatchpilotError
from batchpilot.memory.units import format_bytes

FWD_BWD = ("forward", "backward")
MAX_MICRO_BATCH = 2**31 - 1
"""The largest micro-batch :meth:`MemoryCurve.max_micro_batch` reports: budgets beyond it are capped here."""


@dataclass(frozen=True)
class MemoryCurve:
    """Peak training-step memory M(B), from traced batches (see the module docstring).

    Attributes:
        fixed_bytes: intercept of the large-batch asymptote ``fixed + per_sample * B``.
        per_sample_bytes: bytes each extra sample adds once activations dominate.
        peak_bytes_at: traced batch -> peak bytes.
        breakdown: bytes by category at the peak of the largest traced batch.
        method: ``"fake-tensor mem_tracker"`` or ``"fallback: real measurement ..."``.
        residual_frac: worst relative distance of the traced peaks from the asymptote.
        step_fixed_bytes: least-squares intercept of the optimizer-phase peaks (reporting only).
        step_per_sample_bytes: its slope (the inputs, which stay alive through the step).
        peak_phase_at: traced batch -> phase of the peak (``step2.backward`` ...).
        seq_len: sequence length traced (sequence models), else ``None``.
        options: dtype/amp/checkpointing/target the trace used.
        trace_seconds: total tracing wall time.
    """

    fixed_bytes: float
    per_sample_bytes: float
    peak_bytes_at: dict[int, int]
    breakdown: dict[str, int]
    method: str
    residual_frac: float
    step_fixed_bytes: float = 0.0
    step_per_sample_bytes: float = 0.0
    peak_phase_at: dict[int, str] = field(default_factory=dict)
    seq_len: int | None = None
    options: dict[str, object] = field(default_factory=dict)
    trace_seconds: float = 0.0

    def __post_init__(self) -> None:
        for name in ("fixed_bytes", "per_sample_bytes", "step_fixed_bytes", "step_per_sample_bytes", "residual_frac"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise BatchpilotError(f"MemoryCurve.{name} must be a finite number, got {value!r}")
        if self.per_sample_bytes < 0 or self.step_per_sample_bytes < 0:
            raise BatchpilotError("MemoryCurve per-sample bytes must be >= 0")

    def _points(self) -> list[tuple[int, float]]:
        return sorted((int(b), float(v)) for b, v in self.peak_bytes_at.items())

    def peak_bytes(self, micro_batch: int) -> float:
        """Predicted peak bytes of a training step at ``micro_batch`` (see the module docstring)."""
        b = float(micro_batch)
        pts = self._points()
        if len(pts) < 2:
            return self.fixed_bytes + self.per_sample_bytes * b
        if b >= pts[-1][0]:
            return pts[-1][1] + self.per_sample_bytes * (b - pts[-1][0])
        if b <= pts[0][0]:
            (b0, v0), (b1, v1) = pts[0], pts[1]
            return v0 - (v1 - v0) / (b1 - b0) * (b0 - b)
        for (b0, v0), (b1, v1) in zip(pts, pts[1:]):
            if b0 <= b <= b1:
                return v0 + (v1 - v0) * (b - b0) / (b1 - b0)
        raise AssertionError("unreachable")  # pragma: no cover

    def max_micro_batch(self, budget_bytes: float) -> int:
        """The largest micro-batch whose predicted peak fits in ``budget_bytes``; 0 when batch 1 does not fit.

        At most :data:`MAX_MICRO_BATCH` (a budget beyond it, such as ``--memory 1e30TB``, is capped there).
        M(B) is non-decreasing, so an exponential search then a bisection find it in at most ~62
        evaluations of :meth:`peak_bytes`, whatever the budget.

        Raises:
            BatchpilotError: ``budget_bytes`` is not a number (NaN).
        """
        budget = float(budget_bytes)
        if math.isnan(budget):
            raise BatchpilotError(f"memory budget must be a number of bytes, got {budget_bytes!r}")
        if self.peak_bytes(1) > budget:
            return 0
        if self.peak_bytes(MAX_MICRO_BATCH) <= budget:
            return MAX_MICRO_BATCH
        lo, hi = 1, 2  # peak(lo) fits; find hi that does not
        while self.peak_bytes(hi) <= budget:
            lo, hi = hi, min(2 * hi, MAX_MICRO_BATCH)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.peak_bytes(mid) <= budget:
                lo = mid
            else:
                hi = mid
        return lo

    def activation_share(self, micro_batch: int) -> float:
        """Share of the peak at ``micro_batch`` that scales with the batch."""
        peak = self.peak_bytes(micro_batch)
        return self.per_sample_bytes * micro_batch / peak if peak > 0 else 0.0

    def check_budget(self, budget_bytes: float, what: str = "the budget") -> None:
        """Raise a clear error when even batch 1 does not fit in ``budget_bytes`` (both numbers named)."""
        need = self.peak_bytes(1)
        if need > budget_bytes:
            raise BatchpilotError(
                f"{what} ({format_bytes(budget_bytes)} = {int(budget_bytes)} B) is below the batch-1 peak "
                f"({format_bytes(need)} = {int(need)} B): not even a micro-batch of 1 fits")

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-able data (batch keys become strings in JSON)."""
        return {
            "fixed_bytes": self.fixed_bytes, "per_sample_bytes": self.per_sample_bytes,
            "step_fixed_bytes": self.step_fixed_bytes, "step_per_sample_bytes": self.step_per_sample_bytes,
            "peak_bytes_at": {str(k): v for k, v in sorted(self.peak_bytes_at.items())},
            "peak_phase_at": {str(k): v for k, v in sorted(self.peak_phase_at.items())},
            "breakdown": dict(self.breakdown), "method": self.method, "residual_frac": self.residual_frac,
            "seq_len": self.seq_len, "options": dict(self.options), "trace_seconds": self.trace_seconds,
        }


def fit_line(batches: Sequence[int], values: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``values ~ a + b * batches``; with one point, all of it is fixed (b = 0)."""
    n = len(batches)
    if n == 0:
        raise BatchpilotError("a memory fit needs at least one traced batch")
    if n == 1 or len(set(batches)) == 1:
        return float(max(values)), 0.0
    mx = sum(batches) / n
    my = sum(values) / n
    sxx = sum((x - mx) ** 2 for x in batches)
    sxy = sum((x - mx) * (y - my) for x, y in zip(batches, values))
    slope = max(0.0, sxy / sxx)
    return my - slope * mx, slope


def fit_curve(batches: Sequence[int], fwd_bwd_peaks: Sequence[float], step_peaks: Sequence[float],
              overall_peaks: Sequence[int], **fields: object) -> MemoryCurve:
    """Build the curve from traced peaks; ``fields`` fill the remaining :class:`MemoryCurve` fields.

    The asymptote is the line through the two largest traced batches; the optimizer-phase
    line (``step_*``) is a least-squares fit, kept for reporting.
    """
    pts = sorted(zip(batches, overall_peaks))
    if len(pts) >= 2:
        (b0, v0), (b1, v1) = pts[-2], pts[-1]
        per = max(0.0, (v1 - v0) / (b1 - b0))
        fixed = v1 - per * b1
    else:
        fixed, per = fit_line(batches, fwd_bwd_peaks)
    sfixed, sper = fit_line(batches, step_peaks) if any(step_peaks) else (0.0, 0.0)
    resid = max((abs(fixed + per * b - p) / p for b, p in pts if p > 0), default=0.0)
    return MemoryCurve(fixed_bytes=float(fixed), per_sample_bytes=float(per), step_fixed_bytes=sfixed,
                       step_per_sample_bytes=sper, peak_bytes_at=dict(pts), residual_frac=float(resid),
                       **fields)  # type: ignore[arg-type]
