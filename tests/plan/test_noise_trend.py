"""The noise scale's trend against the loss, the loss at the target, and the samples to it."""

import math

import pytest

from batchpilot.plan.noise_trend import (MAX_GROWTH, fit_noise_trend, loss_at_target, samples_to_target)
from batchpilot.workloads.spec import Target


def test_trend_recovers_a_power_law_and_reads_it_at_a_lower_loss():
    # B = 50 * L^-1.5 (Kaplan et al.'s form), measured from loss 2 down to 0.5
    points = [(l, 50 * l ** -1.5) for l in (2.0, 1.5, 1.0, 0.7, 0.5)]
    trend = fit_noise_trend(points)
    assert trend.slope == pytest.approx(-1.5)
    assert trend.at(0.7) == pytest.approx(50 * 0.7 ** -1.5)  # inside the measured range
    assert trend.at(0.35) == pytest.approx(50 * 0.35 ** -1.5)  # 1.7x beyond the largest measured: trusted
    assert trend.at(0.1) == pytest.approx(MAX_GROWTH * 50 * 0.5 ** -1.5)  # far beyond: capped
    assert not trend.clipped


def test_trend_never_falls_with_the_loss_and_caps_extrapolation():
    falling = fit_noise_trend([(2.0, 400.0), (1.0, 200.0), (0.5, 100.0)])  # B shrinks as L falls: noise
    assert falling.slope == 0.0 and falling.clipped
    assert falling.at(0.01) == pytest.approx(falling.at(2.0))
    steep = fit_noise_trend([(1.0, 10.0), (0.9, 100.0)])
    assert steep.slope == pytest.approx(-6.0)
    assert steep.at(1e-6) == pytest.approx(MAX_GROWTH * 100.0)


def test_trend_skips_unusable_points():
    assert fit_noise_trend([]) is None
    assert fit_noise_trend([(1.0, math.nan), (-1.0, 5.0), (1.0, math.inf)]) is None
    one = fit_noise_trend([(1.0, 30.0), (0.5, -2.0)])
    assert one.slope == 0.0 and one.at(0.1) == pytest.approx(30.0)


def test_loss_at_target_measured_extrapolated_or_last():
    acc = Target("val_acc", ">=", 0.9)
    reached = [(1.5, 0.5), (1.0, 0.7), (0.6, 0.91), (0.5, 0.93)]
    assert loss_at_target(reached, acc).loss == 0.6 and loss_at_target(reached, acc).source == "reached"
    # metric = 0.3 - 0.4 log(L): 0.9 at L = e^-1.5
    curve = [(l, 0.3 - 0.4 * math.log(l)) for l in (2.0, 1.6, 1.3, 1.1, 0.9, 0.8)]
    got = loss_at_target(curve, acc)
    assert got.source == "extrapolated"
    assert got.loss == pytest.approx(math.exp(-1.5), rel=1e-6)
    assert got.extrapolation == pytest.approx(0.8 / math.exp(-1.5))
    flat = [(1.0, 0.5), (0.9, 0.4), (0.8, 0.3)]  # the metric gets worse as the loss falls: no trend toward it
    assert loss_at_target(flat, acc).source == "last"
    assert loss_at_target(flat, Target("val_loss", "<=", 0.2)).loss == 0.2


def test_samples_to_target_measured_or_log_linear_extrapolation():
    acc = Target("val_acc", ">=", 0.8)
    assert samples_to_target([(100, 0.5), (200, 0.85)], acc) == (200.0, 1.0)
    # metric = 0.1 ln(s) - 0.2: 0.8 at s = e^10
    evals = [(s, 0.1 * math.log(s) - 0.2) for s in (1000, 2000, 4000, 8000)]
    samples, factor = samples_to_target(evals, acc)
    assert samples == pytest.approx(math.exp(10.0), rel=1e-6)
    assert factor == pytest.approx(math.exp(10.0) / 8000)
    assert samples_to_target(evals, acc, max_factor=2.0) == (None, pytest.approx(math.nan, nan_ok=True))
    assert samples_to_target([(100, 0.5), (200, 0.4)], acc)[0] is None


def test_far_roots_do_not_overflow():
    acc = Target("val_acc", ">=", 0.99)
    nearly_flat = [(s, 0.5 + 1e-9 * s) for s in (1000, 2000, 4000, 8000)]  # the root lies at ~e^(1e8)
    assert samples_to_target(nearly_flat, acc)[0] is None
    flat_loss = [(l, 0.5 - 1e-9 * math.log(l)) for l in (2.0, 1.5, 1.2, 1.0)]
    got = loss_at_target(flat_loss, acc)
    assert got.loss > 0 and math.isfinite(got.loss)
