"""Throughput: the step-time fit, interpolation, FLOP counting, peaks, and that measuring disturbs nothing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.errors import BatchpilotError
from batchpilot.throughput.measure import (
    PeakFlops,
    ThroughputCurve,
    ThroughputPoint,
    choose_cpu_threads,
    default_batches,
    fit_step_time,
    gpu_peak_flops,
    measure_throughput,
)
from batchpilot.workloads import Workload


def _linear_workload(n: int = 256, d_in: int = 10, d_out: int = 3) -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, d_out, (n,), generator=g)
    return Workload(
        name="linear", make_model=lambda: nn.Linear(d_in, d_out, bias=False), train_data=TensorDataset(x, y),
        val_data=TensorDataset(x[:16], y[:16]), loss_sum=lambda o, t: F.cross_entropy(o, t, reduction="sum"),
        make_optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr), base_batch=16, base_lr=0.1,
    )


def test_fit_recovers_an_exact_line_and_never_goes_negative():
    bs = [8, 16, 32, 64, 128]
    overhead, per_sample = fit_step_time(bs, [0.002 + 1e-5 * b for b in bs])
    assert overhead == pytest.approx(0.002, rel=1e-6)
    assert per_sample == pytest.approx(1e-5, rel=1e-6)
    overhead, per_sample = fit_step_time(bs, [1e-5 * b - 1e-4 for b in bs])  # would fit a negative overhead
    assert overhead == 0.0 and per_sample > 0


def test_default_batches_are_geometric_and_end_at_the_limit():
    assert default_batches(32, 300) == [8, 16, 32, 64, 128, 256, 300]
    assert default_batches(32, 4) == [4]
    assert default_batches(1, 8) == [1, 2, 4, 8]
    with pytest.raises(BatchpilotError):
        default_batches(32, 0)


def _curve(points) -> ThroughputCurve:
    pts = tuple(ThroughputPoint(b, s + 0.001, s, 0.001, 0.0, 0.0, b / (s + 0.001), 0.0) for b, s in points)
    return ThroughputCurve(pts, overhead_s=0.001, per_sample_s=1e-4, saturation_batch=90.0, peak_flops=1.0,
                           peak_source="test", device="cpu", threads=1)


def test_curve_interpolates_inside_and_extrapolates_with_the_fit():
    curve = _curve([(16, 0.002), (64, 0.008)])
    assert curve.micro_s(16) == 0.002
    assert 0.002 < curve.micro_s(32) < 0.008
    assert curve.micro_s(32) == pytest.approx(0.004, rel=1e-9)  # log-log interpolation of a line through 0
    assert curve.micro_s(128) == pytest.approx(0.008 + 1e-4 * 64)
    assert curve.step_s(16, 4) == pytest.approx(4 * 0.002 + 0.001)  # accumulation: k micro-steps, one optimizer step
    assert curve.samples_per_s(16, 4) == pytest.approx(64 / (4 * 0.002 + 0.001))


def test_measure_counts_flops_exactly_and_leaves_rng_alone():
    w = _linear_workload()
    rng = torch.get_rng_state()
    curve = measure_throughput(w, batch_sizes=[4, 16], warmup_steps=1, timed_steps=2, peak=PeakFlops(1e9, "test"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert curve.batches == [4, 16]
    for p in curve.points:
        # forward x@W^T (2·B·in·out) + weight gradient (2·B·in·out); the input needs no gradient
        assert p.flops == 4 * p.batch * 10 * 3
        assert p.samples_per_s == pytest.approx(p.batch / p.step_s)
        assert p.micro_s + p.optimizer_s == pytest.approx(p.step_s)
        assert p.mfu == pytest.approx(p.flops / p.step_s / 1e9)
    assert curve.overhead_s >= 0 and curve.per_sample_s > 0


def test_measure_rejects_bad_input():
    w = _linear_workload()
    with pytest.raises(BatchpilotError):
        measure_throughput(w, batch_sizes=[0], peak=PeakFlops(1.0, "t"))
    with pytest.raises(BatchpilotError):
        measure_throughput(w, batch_sizes=[4], timed_steps=0, peak=PeakFlops(1.0, "t"))
    with pytest.raises(BatchpilotError):
        measure_throughput(w, batch_sizes=[4], dtype="int8x", peak=PeakFlops(1.0, "t"))


def test_gpu_peak_table_lookup():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3").flops_per_s == 67e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16").flops_per_s == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA H100 PCIe").flops_per_s == 51e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB", tf32=True).flops_per_s == 156e12
    assert "datasheet" in gpu_peak_flops("Tesla T4").source
    assert gpu_peak_flops("Some Future GPU") is None
    assert gpu_peak_flops("NVIDIA L40S") is None  # not the L4
    assert gpu_peak_flops("NVIDIA L4").flops_per_s == pytest.approx(30.3e12)


def test_thread_choice_restores_the_setting():
    w = _linear_workload()
    torch.set_num_threads(2)
    best, scores = choose_cpu_threads(w, [8], steps=2)
    assert torch.get_num_threads() == 2
    assert best in (1, 2) and set(scores) == {1, 2}
    assert scores[best] == max(scores.values())


def _rounds_curve(rounds_a, rounds_b) -> ThroughputCurve:
    pts = tuple(ThroughputPoint(b, r[0], r[0], 0.0, 0.0, 0.0, b / r[0], 0.0, round_step_s=tuple(r))
                for b, r in ((16, rounds_a), (64, rounds_b)))
    return ThroughputCurve(pts, overhead_s=0.0, per_sample_s=1e-4, saturation_batch=1.0, peak_flops=1.0,
                           peak_source="test", device="cpu", threads=1)


def test_interleaved_rounds_cancel_load_that_hits_every_batch_alike():
    # the machine slows 3x between rounds, but batch 64 always takes 4x batch 16: the ratio is certain
    drift = _rounds_curve([0.001, 0.003, 0.002], [0.004, 0.012, 0.008])
    assert drift.log_ratio_uncertainty(16, 64) == pytest.approx(0.0, abs=1e-12)
    assert drift.log_ratio_uncertainty(16, 16) == 0.0
    # when only one batch's rounds move, the ratio is uncertain
    noisy = _rounds_curve([0.001, 0.003, 0.002], [0.004, 0.004, 0.004])
    assert noisy.log_ratio_uncertainty(16, 64) > 0.3


def test_measure_throughput_times_interleaved_rounds():
    torch.set_num_threads(1)
    from batchpilot import get_workload

    w = get_workload("mnist1d-mlp", num_train=512, num_val=64)
    curve = measure_throughput(w, batch_sizes=[8, 32], warmup_steps=1, timed_steps=2, rounds=3,
                               peak=PeakFlops(1.0, "test"))
    assert [len(p.round_step_s) for p in curve.points] == [3, 3]
    u = curve.log_ratio_uncertainty(8, 32)
    assert math.isfinite(u) and u >= 0


def test_fitted_step_model_is_smooth_and_monotone():
    curve = _curve([(16, 0.002), (32, 0.0025), (64, 0.008)])  # a noisy middle point
    import dataclasses

    fit = dataclasses.replace(curve, step_model="fit")
    steps = [fit.step_s(b) for b in (8, 16, 24, 32, 48, 64, 128)]
    assert steps == sorted(steps)
    per_sample = [fit.step_s(b) / b for b in (8, 16, 24, 32, 48, 64, 128)]
    assert per_sample == sorted(per_sample, reverse=True)
    assert fit.step_s(32) == pytest.approx(curve.overhead_s + curve.per_sample_s * 32)
    assert curve.step_s(32) == pytest.approx(0.0025 + 0.001)  # points: the measured value


def test_points_model_never_lets_a_larger_batch_be_faster():
    from batchpilot.throughput.measure import monotone

    assert monotone([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert monotone([4.55, 14.63, 24.56, 51.14, 27.15, 221.7]) == pytest.approx(
        [4.55, 14.63, 24.56, 39.145, 39.145, 221.7])
    dip = _curve([(16, 0.002), (32, 0.006), (64, 0.004), (128, 0.01)])  # a quiet moment at 64
    steps = [dip.step_s(b) for b in (16, 32, 48, 64, 96, 128)]
    assert all(b >= a - 1e-12 for a, b in zip(steps, steps[1:]))  # (log-log interpolation rounds in the last bit)
    assert dip.step_s(64) == pytest.approx(0.005 + 0.001)  # the dip pooled with its neighbour
