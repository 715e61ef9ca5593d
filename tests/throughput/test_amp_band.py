"""Mixed precision (throughput/amp.py) and the predicted step-time band (throughput/band.py). CPU only."""

from __future__ import annotations

import math

import pytest
import torch

from batchpilot.errors import BatchpilotError
from batchpilot.throughput import amp, band
from batchpilot.throughput.measure import measure_throughput
from batchpilot.train.accumulation import accumulate_gradients
from batchpilot.workloads.common import cross_entropy_sum


@pytest.mark.parametrize("text,expected", [("bf16", "bfloat16"), ("BFloat16", "bfloat16"), ("fp16", "float16"),
                                           ("half", "float16"), (None, None), ("off", None), ("fp32", None)])
def test_parse_amp(text, expected):
    assert amp.parse_amp(text) == expected


def test_bad_amp_names_the_value():
    with pytest.raises(BatchpilotError, match="--amp must be bf16 or fp16, got 'int8'"):
        amp.parse_amp("int8")


def test_fp16_on_the_cpu_is_refused_with_the_way_out():
    with pytest.raises(BatchpilotError, match="fp16 needs a CUDA device.*use --amp bf16"):
        amp.amp_policy("fp16", "cpu")
    cuda = amp.amp_policy("fp16", "cuda")  # a policy only: nothing runs on a GPU here
    assert cuda.needs_scaler and cuda.short == "fp16"
    bf16 = amp.amp_policy("bf16", "cpu")
    assert not bf16.needs_scaler and bf16.make_scaler() is None
    with pytest.raises(BatchpilotError, match="amp dtype must be"):
        amp.AmpPolicy("float32", "cpu")


def test_bf16_autocast_runs_the_forward_in_bf16_with_fp32_weights():
    model = torch.nn.Linear(8, 4)
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    policy = amp.amp_policy("bf16", "cpu")
    accumulate_gradients(model, [(x[:3], y[:3]), (x[3:], y[3:])], cross_entropy_sum, lambda t: len(t),
                         autocast=policy.autocast)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert model.weight.dtype == torch.float32 and model.weight.grad.dtype == torch.float32


def test_fp16_loss_scaling_gives_the_unscaled_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    accumulate_gradients(model, [(x, y)], cross_entropy_sum, lambda t: len(t))
    ref = model.weight.grad.clone()
    model.zero_grad()
    policy = amp.AmpPolicy("float16", "cpu")  # the CUDA recipe, run with the CPU's scaler for the test
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    accumulate_gradients(model, [(x, y)], cross_entropy_sum, lambda t: len(t), autocast=policy.autocast, scaler=scaler)
    assert not torch.allclose(model.weight.grad, ref, rtol=0.1)  # scaled
    scaler.unscale_(opt)
    assert torch.allclose(model.weight.grad, ref, rtol=2e-2, atol=2e-3)


def test_train_config_takes_bf16_and_refuses_fp16_and_half_weights():
    from batchpilot.train import TrainConfig

    assert TrainConfig(global_batch=8, steps=1, amp="bfloat16").amp == "bfloat16"
    with pytest.raises(BatchpilotError, match="use --amp bf16"):
        TrainConfig(global_batch=8, steps=1, amp="float16")
    with pytest.raises(BatchpilotError, match="needs dtype float32"):
        TrainConfig(global_batch=8, steps=1, amp="bfloat16", dtype="bfloat16")


def test_training_under_bf16_autocast_learns(mlp_workload):
    from batchpilot.train import TrainConfig, train

    result = train(mlp_workload, TrainConfig(global_batch=32, micro_batch_per_rank=16, steps=30, amp="bfloat16"))
    assert result.amp == "bfloat16" and math.isfinite(result.final_train_loss)
    assert result.final_train_loss < 2.0


def test_measured_throughput_under_amp_uses_the_bf16_peak(mlp_workload):
    curve = measure_throughput(mlp_workload, batch_sizes=[8, 16], timed_steps=2, warmup_steps=1, rounds=1, amp="bf16")
    assert "bfloat16" in curve.peak_source and all(p.step_s > 0 for p in curve.points)
    with pytest.raises(BatchpilotError, match="fp16 needs a CUDA device"):
        measure_throughput(mlp_workload, batch_sizes=[8], amp="fp16")


def test_the_documented_band_is_the_uncertainty_either_way():
    b = band.DOCUMENTED
    assert b.high_factor == band.UNCERTAINTY and b.low_factor == pytest.approx(1 / band.UNCERTAINTY)
    assert b.rate(150.0) == pytest.approx((100.0, 225.0)) and b.step_s(1.0) == pytest.approx((1 / 1.5, 1.5))
    assert "documented" in b.describe()


@pytest.mark.parametrize("kwargs,match", [
    (dict(low_factor=1.2, high_factor=1.5, relative=0.1), "low_factor <= 1"),
    (dict(low_factor=0.5, high_factor=math.inf, relative=0.1), "high_factor < inf"),
    (dict(low_factor=0.5, high_factor=1.5, relative=-1.0), "relative uncertainty"),
])
def test_bad_bands_are_refused(kwargs, match):
    with pytest.raises(BatchpilotError, match=match):
        band.StepTimeBand(source="x", **kwargs)


def test_calibration_centres_on_the_measured_ratio():
    cal = band.calibrate([2.0, 4.4, 7.6], [1.0, 2.0, 4.0], "H100")
    assert cal.factor == pytest.approx((2.0 * 2.2 * 1.9) ** (1 / 3))
    assert cal.band.low_factor < 1 < cal.band.high_factor < 1.1
    assert cal.band.relative >= band.MIN_CALIBRATED_RELATIVE and "calibrated on H100" in cal.band.source
    exact = band.calibrate([2.0, 4.0], [1.0, 2.0], "cpu")
    assert exact.factor == pytest.approx(2.0) and exact.band.relative == band.MIN_CALIBRATED_RELATIVE
    with pytest.raises(BatchpilotError, match="at least two"):
        band.calibrate([1.0], [1.0], "cpu")
    with pytest.raises(BatchpilotError, match="positive finite"):
        band.calibrate([1.0, 0.0], [1.0, 1.0], "cpu")
