"""The memory curve M(B): peak training-step memory as a function of the micro-batch.

Each traced step has two kinds of peak:

* forward/backward phases, where activations scale with the batch:
  ``fixed_bytes + per_sample_bytes * B``;
* optimizer phases, where activations are gone and only the inputs scale:
  ``step_fixed_bytes + step_per_sample_bytes * B`` (the optimizer-state creation and
  the update's temporaries; for small models this is the peak at small batches).

``M(B)`` is the larger of the two lines. Both are least-squares fits to the traced
phase peaks at 2-3 batches; ``residual_frac`` is the worst relative residual of the
combined model at the traced points (0 for a step whose memory is exactly linear).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from batchpilot.errors import BatchpilotError
from batchpilot.memory.units import format_bytes

FWD_BWD = ("forward", "backward")


@dataclass(frozen=True)
class MemoryCurve:
    """``M(B) = max(fixed + per_sample * B, step_fixed + step_per_sample * B)``, fitted from traces.

    Attributes:
        fixed_bytes: batch-independent part of the forward/backward peak (params, grads, optimizer state...).
        per_sample_bytes: bytes each sample of the micro-batch adds at that peak.
        peak_bytes_at: traced batch -> peak bytes.
        breakdown: bytes by category at the peak of the largest traced batch.
        method: ``"fake-tensor mem_tracker"`` or ``"fallback: real measurement ..."``.
        residual_frac: worst relative residual of the fit at the traced batches.
        step_fixed_bytes: batch-independent part of the optimizer-phase peak.
        step_per_sample_bytes: per-sample part of the optimizer-phase peak (the inputs).
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

    def peak_bytes(self, micro_batch: int) -> float:
        """Predicted peak bytes of a training step at ``micro_batch``."""
        b = float(micro_batch)
        return max(self.fixed_bytes + self.per_sample_bytes * b, self.step_fixed_bytes + self.step_per_sample_bytes * b)

    def max_micro_batch(self, budget_bytes: float) -> int:
        """The largest micro-batch whose predicted peak fits in ``budget_bytes``; 0 when batch 1 does not fit."""
        if self.peak_bytes(1) > budget_bytes:
            return 0
        limits = []
        for fixed, per in ((self.fixed_bytes, self.per_sample_bytes), (self.step_fixed_bytes, self.step_per_sample_bytes)):
            if per > 0:
                limits.append(math.floor((budget_bytes - fixed) / per))
        if not limits:
            return 2**31 - 1
        b = max(1, min(limits))
        while b > 1 and self.peak_bytes(b) > budget_bytes:  # float rounding at the boundary
            b -= 1
        while self.peak_bytes(b + 1) <= budget_bytes and b < 2**31 - 1:
            b += 1
        return b

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
    """Fit both lines and the residual; ``fields`` fill the remaining :class:`MemoryCurve` fields."""
    fixed, per = fit_line(batches, fwd_bwd_peaks)
    sfixed, sper = fit_line(batches, step_peaks) if any(step_peaks) else (0.0, 0.0)
    curve = MemoryCurve(fixed_bytes=fixed, per_sample_bytes=per, step_fixed_bytes=sfixed, step_per_sample_bytes=sper,
                        peak_bytes_at=dict(zip(batches, overall_peaks)), residual_frac=0.0, **fields)  # type: ignore[arg-type]
    resid = max((abs(curve.peak_bytes(b) - p) / p for b, p in zip(batches, overall_peaks) if p > 0), default=0.0)
    return MemoryCurve(**{**curve.__dict__, "residual_frac": float(resid)})
