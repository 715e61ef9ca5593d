"""The largest micro-batch: a bounded search that agrees with brute force and returns at once for any
budget (``--memory 1e30TB`` used to loop for ever)."""

from __future__ import annotations

import contextlib
import json
import math
import signal

import pytest

from batchpilot.cli import main
from batchpilot.errors import BatchpilotError
from batchpilot.memory import MemoryCurve
from batchpilot.memory.curve import MAX_MICRO_BATCH, fit_curve
from batchpilot.memory.trace import mem_tracker_available


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (rather than hang) when the block runs longer than ``seconds``."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class CountingCurve(MemoryCurve):
    def peak_bytes(self, micro_batch: int) -> float:
        object.__setattr__(self, "calls", getattr(self, "calls", 0) + 1)
        return super().peak_bytes(micro_batch)


def _curve(points: dict[int, int], cls=MemoryCurve) -> MemoryCurve:
    c = fit_curve(list(points), [0.0] * len(points), [0.0] * len(points), list(points.values()),
                  breakdown={}, method="test")
    return cls(**{f: getattr(c, f) for f in c.__dataclass_fields__})


# convex and piecewise linear: flat while fixed memory dominates, then activations take over
CONVEX = {1: 1_000_000, 4: 1_000_000, 16: 1_000_400, 64: 1_020_000, 256: 1_200_000}


@pytest.mark.parametrize("budget", [0, 999_999, 1_000_000, 1_000_001, 1_000_399, 1_010_000, 1_019_999,
                                    1_100_000, 1_199_999, 1_200_000, 1_234_567, 2_000_000])
def test_agrees_with_brute_force(budget):
    curve = _curve(CONVEX)
    brute = max((b for b in range(1, 20_000) if curve.peak_bytes(b) <= budget), default=0)
    assert curve.max_micro_batch(budget) == brute


@pytest.mark.parametrize("budget", [1e42, 9.0e41, math.inf, float(2**62), 1e300])
def test_absurd_budgets_return_the_cap_at_once(budget):
    curve = _curve(CONVEX, CountingCurve)
    with deadline(5):
        assert curve.max_micro_batch(budget) == MAX_MICRO_BATCH
    assert curve.calls <= 3


def test_any_budget_takes_a_bounded_number_of_evaluations():
    curve = _curve(CONVEX, CountingCurve)
    for exponent in range(6, 40):
        object.__setattr__(curve, "calls", 0)
        with deadline(5):
            m = curve.max_micro_batch(10.0 ** (exponent / 2 + 4))
        assert curve.calls <= 70
        assert curve.peak_bytes(m) <= 10.0 ** (exponent / 2 + 4) and (
            m == MAX_MICRO_BATCH or curve.peak_bytes(m + 1) > 10.0 ** (exponent / 2 + 4))


def test_zero_per_sample_cost_and_nan_budget():
    flat = _curve({1: 500, 8: 500})
    assert flat.max_micro_batch(500) == MAX_MICRO_BATCH and flat.max_micro_batch(499) == 0
    with pytest.raises(BatchpilotError, match="memory budget must be a number"):
        flat.max_micro_batch(math.nan)


@pytest.mark.skipif(not mem_tracker_available(), reason="needs torch MemTracker (torch >= 2.5)")
def test_cli_memory_1e30tb_returns_capped(capsys):
    with deadline(120):
        code = main(["memory", "--workload", "mnist1d-mlp", "--workload-opt", "num_train=200", "--workload-opt",
                     "num_val=50", "--memory", "1e30TB", "--batch-sizes", "1,8", "--no-what-if", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["max_micro_batch"] == MAX_MICRO_BATCH
