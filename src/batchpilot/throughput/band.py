"""The uncertainty band of a predicted step time, and its calibration on a device that was measured.

A step time predicted by :mod:`batchpilot.throughput.predict` (a roofline over the traced ops: Williams et al.
2009, "Roofline: an insightful visual performance model for multicore architectures", CACM 52(4)) rests on
assumed efficiencies. Its error has two parts, and the plan needs both:

* the **absolute** band: how far every predicted step may be off together (the efficiencies are wrong for the
  whole model): ``[step_s * low, step_s * high]``. It moves samples/s, goodput and the time to the target, but
  not which batch is best. The plan carries it into each candidate's ``goodput_band``.
* the **relative** band: how far the ratio of two batches' predicted steps may be off (the launch-, memory- and
  compute-bound regimes shift at other batches than predicted). It decides which candidates tie.

Until the device is measured both are documented assumptions (:data:`DOCUMENTED`). :func:`calibrate` turns
measured and predicted step times on one device into an efficiency factor (measured / predicted, the geometric
mean) and the band of what is left: ``bench/gpu_check.py`` does this on a GPU.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Sequence

from batchpilot.errors import BatchpilotError

UNCERTAINTY = 1.5
"""Predicted step times are good to this factor either way until measured on the device (an assumption: the
matmul efficiency alone spans 0.3-0.6 of peak between small and large shapes)."""
PREDICTED_RELATIVE = 0.10
"""Log-uncertainty of the ratio of two batches' predicted step times (a 10% band): candidates whose predicted
goodput is within it of the best tie (an assumption until :func:`calibrate` measures it)."""
MIN_CALIBRATED_RELATIVE = 0.02
"""A calibrated relative band is never narrower than this (three or four timed batches cannot show less)."""


@dataclass(frozen=True)
class StepTimeBand:
    """How far a predicted step time may be off.

    Attributes:
        low_factor: the fast end, as a multiple of the predicted step (``<= 1``).
        high_factor: the slow end (``>= 1``).
        relative: log-uncertainty of the ratio of two batches' predicted steps (the tie margin).
        source: ``documented: ...`` or ``calibrated: ...`` (where the numbers come from).
    """

    low_factor: float
    high_factor: float
    relative: float
    source: str

    def __post_init__(self) -> None:
        if not (0 < self.low_factor <= 1 <= self.high_factor and math.isfinite(self.high_factor)):
            raise BatchpilotError(f"a step-time band needs 0 < low_factor <= 1 <= high_factor < inf, got "
                                  f"{self.low_factor!r} and {self.high_factor!r}")
        if not (self.relative >= 0 and math.isfinite(self.relative)):
            raise BatchpilotError(f"a step-time band's relative uncertainty must be a finite number >= 0, got "
                                  f"{self.relative!r}")
        if not isinstance(self.source, str) or not self.source.strip():
            raise BatchpilotError(f"a step-time band needs a source, got {self.source!r}")

    def step_s(self, step_s: float) -> tuple[float, float]:
        """``(fast, slow)`` step times around a predicted ``step_s``."""
        return step_s * self.low_factor, step_s * self.high_factor

    def rate(self, per_s: float) -> tuple[float, float]:
        """``(low, high)`` of a rate (samples/s, goodput) computed from a predicted step: ``per_s / high .. / low``."""
        return per_s / self.high_factor, per_s / self.low_factor

    def describe(self) -> str:
        """One line: the band and where it comes from."""
        return (f"step time x{1 / self.low_factor:.2g} faster to x{self.high_factor:.2g} slower, "
                f"{self.relative:.0%} between batches ({self.source})")

    def to_dict(self) -> dict:
        """Plain data."""
        return asdict(self)


DOCUMENTED = StepTimeBand(low_factor=1 / UNCERTAINTY, high_factor=UNCERTAINTY, relative=PREDICTED_RELATIVE,
                          source=f"documented assumption: x{UNCERTAINTY:g} either way, {PREDICTED_RELATIVE:.0%} between "
                                 "batches; not calibrated on a GPU (docs/gpu.md)")


@dataclass(frozen=True)
class Calibration:
    """Measured against predicted step times on one device.

    Attributes:
        device: the measured device.
        factor: the efficiency correction, ``geomean(measured / predicted)`` (> 1: the device is slower than
            predicted).
        ratios: ``measured / predicted`` at each batch.
        band: what is left once ``factor`` is applied: the spread of the ratios around it.
    """

    device: str
    factor: float
    ratios: tuple[float, ...]
    band: StepTimeBand

    def __post_init__(self) -> None:
        if not (self.factor > 0 and math.isfinite(self.factor)):
            raise BatchpilotError(f"a calibration factor must be a positive finite number, got {self.factor!r}")

    def to_dict(self) -> dict:
        """Plain data."""
        return {"device": self.device, "factor": self.factor, "ratios": list(self.ratios), "band": self.band.to_dict()}

    @classmethod
    def from_dict(cls, data: dict, source: str = "calibration") -> "Calibration":
        """The inverse of :meth:`to_dict` (one entry of ``gpu_check.json``'s ``calibration`` list).

        Raises:
            BatchpilotError: a missing or malformed field, named.
        """
        try:
            b = data["band"]
            return cls(device=str(data["device"]), factor=float(data["factor"]),
                       ratios=tuple(float(r) for r in data.get("ratios", ())),
                       band=StepTimeBand(low_factor=float(b["low_factor"]), high_factor=float(b["high_factor"]),
                                         relative=float(b["relative"]), source=str(b["source"])))
        except BatchpilotError as exc:  # a field of the right type with a bad value: that value, named
            raise BatchpilotError(f"{source}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise BatchpilotError(f"{source}: expected device, factor and band (low_factor, high_factor, relative, "
                                  f"source), as bench/gpu_check.py writes them; {type(exc).__name__}: {exc}") from None


def load_calibration(path: str, *, amp: bool) -> Calibration:
    """The calibration for fp32 (``amp=False``) or bf16 autocast from ``bench/gpu_check.py``'s ``gpu_check.json``
    (its ``calibration`` list), or from a file holding one calibration.

    Raises:
        BatchpilotError: an unreadable file, or no calibration of that precision in it.
    """
    import json

    from batchpilot.files import check_input_file

    where = f"calibration file {path!r}"
    file = check_input_file(path, "--calibration", "gpu_check.json from bench/gpu_check.py")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except RecursionError:
        raise BatchpilotError(f"{where} is not readable JSON: nested too deeply") from None
    except (OSError, ValueError) as exc:
        raise BatchpilotError(f"{where} is not readable JSON: {exc}") from None
    if isinstance(data, dict) and "factor" in data:
        return Calibration.from_dict(data, where)
    entries = data.get("calibration") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        entries = None
    want = "bf16 autocast" if amp else "fp32"
    hit = [e for e in entries or [] if isinstance(e, dict) and e.get("precision") == want and "factor" in e]
    if not hit:
        raise BatchpilotError(f"{where} holds no {want} calibration; expected gpu_check.json from bench/gpu_check.py "
                              "(its step section) or one calibration object")
    return Calibration.from_dict(hit[0], where)


def calibrate(measured_s: Sequence[float], predicted_s: Sequence[float], device: str) -> Calibration:
    """The efficiency factor and the band from step times measured and predicted at the same batches.

    The factor is the geometric mean of ``measured / predicted``; the absolute band is the widest ratio on
    either side of it; the relative band is two standard deviations of the log ratios (at least
    :data:`MIN_CALIBRATED_RELATIVE`), the error a ratio between two batches keeps after the correction.

    Raises:
        BatchpilotError: lengths differ, fewer than two pairs, or a time that is not a positive finite number.
    """
    if len(measured_s) != len(predicted_s):
        raise BatchpilotError(f"calibration needs as many measured as predicted step times, got {len(measured_s)} "
                              f"and {len(predicted_s)}")
    if len(measured_s) < 2:
        raise BatchpilotError(f"calibration needs at least two batches, got {len(measured_s)}")
    for name, values in (("measured", measured_s), ("predicted", predicted_s)):
        bad = [v for v in values if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v))]
        if bad:
            raise BatchpilotError(f"{name} step times must be positive finite seconds, got {bad[0]!r}")
    logs = [math.log(m / p) for m, p in zip(measured_s, predicted_s)]
    center = statistics.fmean(logs)
    spread = [x - center for x in logs]
    relative = max(MIN_CALIBRATED_RELATIVE, 2 * statistics.stdev(logs))
    band = StepTimeBand(low_factor=math.exp(min(0.0, min(spread))), high_factor=math.exp(max(0.0, max(spread))),
                        relative=relative, source=f"calibrated on {device}: measured/predicted x{math.exp(center):.3g} "
                                                  f"over {len(logs)} batches")
    return Calibration(device=device, factor=math.exp(center), ratios=tuple(math.exp(x) for x in logs), band=band)


__all__ = ["Calibration", "DOCUMENTED", "PREDICTED_RELATIVE", "StepTimeBand", "UNCERTAINTY", "calibrate",
           "load_calibration"]
