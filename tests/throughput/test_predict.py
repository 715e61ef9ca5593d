"""Predicted step time for an absent GPU: the op trace, the roofline, the plan's hook. CPU only."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from batchpilot.errors import BatchpilotError
from batchpilot.memory import resolve_device
from batchpilot.throughput import predict
from batchpilot.throughput.measure import _count_flops
from batchpilot.workloads import Workload, get_workload
from batchpilot.workloads.common import cross_entropy_sum


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mlp(width: int = 512, depth: int = 3, n: int = 256) -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, width, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)

    def make_model():
        layers = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))

    return Workload(name="mlp", make_model=make_model, train_data=TensorDataset(x, y), val_data=TensorDataset(x, y),
                    loss_sum=cross_entropy_sum, make_optimizer=lambda p, lr: torch.optim.AdamW(p, lr=lr),
                    base_batch=32, base_lr=1e-3)


@pytest.mark.parametrize("name", ["H100", "h100", "H100-SXM", "NVIDIA H100 80GB HBM3", "H100-PCIE", "NVIDIA H100 PCIe",
                                  "A100", "A100-40GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB", "H200",
                                  "RTX 4090", "NVIDIA GeForce RTX 4090", "T4", "L4"])
def test_gpu_names_resolve(name):
    model = predict.gpu_model(name)
    assert model is not None and model.bandwidth > 0 and model.peak_flops["half"] > model.peak_flops["fp32"] > 0


def test_gpu_name_variants_pick_their_own_figures():
    assert predict.gpu_model("NVIDIA H100 80GB HBM3").name == "H100"
    assert predict.gpu_model("NVIDIA H100 PCIe").name == "H100-PCIE"
    assert predict.gpu_model("NVIDIA A100-SXM4-40GB").bandwidth == predict.GPU_BANDWIDTH["A100-40GB"]
    assert predict.gpu_model("L40S") is None and predict.gpu_model("B200") is None  # peak or bandwidth not tabled
    with pytest.raises(BatchpilotError, match="no step-time model for GPU 'L40S'.*known: H200"):
        predict.step_time_model(_mlp(), "L40S")


def test_traced_flops_equal_the_flop_counter_on_a_real_step():
    w = _mlp()
    trace = predict.trace_ops(w, 16, target="cpu")
    torch.manual_seed(0)
    model = w.make_model()
    x, y = w.train_data[:16]
    assert trace.total_flops("micro") == _count_flops(model, w.loss_sum, x, y, 16)
    assert trace.total_flops("optimizer") == 0 and "_foreach_mul_" not in trace.names  # CPU target: for-loop AdamW
    assert set(trace.phase) == {"micro", "optimizer"}


def test_the_linear_model_matches_a_trace_at_another_batch():
    w = get_workload("charlm")
    stm = predict.step_time_model(w, "H100", batches=(2, 4))
    direct = predict.trace_ops(w, 24, target="cuda")
    linear = stm.predict(24)
    assert linear.flops == pytest.approx(direct.total_flops("micro"), rel=1e-9)
    exact = predict.StepTimeModel(direct, predict.trace_ops(w, 8, target="cuda"), stm.device).predict(24)
    assert linear.step_s == pytest.approx(exact.step_s, rel=1e-6)


def test_roofline_bounds():
    big = predict.step_time_model(_mlp(width=2048, depth=4), "H100")
    # a wide MLP at a large batch: compute-bound, and fp32 matmuls run at the fp32 CUDA-core peak
    p = big.predict(8192)
    assert p.bound == "compute"
    flops = p.flops + 0.0
    assert p.micro_s >= flops / (67e12 * predict.MATMUL_EFFICIENCY) * 0.999
    # at batch 1 the same model is launch-bound: one kernel launch per op sets the floor
    small = big.predict(1)
    assert small.bound == "launch" and small.step_s == pytest.approx(big.launches.sum() * predict.LAUNCH_S, rel=1e-9)
    # bigger batches never take less time, and samples/s never falls
    times = [big.predict(b).step_s for b in (1, 8, 64, 512, 4096)]
    assert times == sorted(times)


def test_bf16_autocast_is_predicted_faster_when_compute_bound():
    w = _mlp(width=2048, depth=4)
    fp32 = predict.step_time_model(w, "H100").predict(8192).step_s
    amp = predict.step_time_model(w, "H100", amp=True).predict(8192).step_s
    assert amp < fp32 / 3  # 989 vs 67 TFLOP/s on the matmuls; the memory-bound rest is unchanged


def test_a_faster_gpu_is_predicted_faster():
    stm_h = predict.step_time_model(_mlp(width=1024), "H100")
    stm_a = predict.step_time_model(_mlp(width=1024), "A100")
    assert stm_h.predict(4096).step_s < stm_a.predict(4096).step_s


def test_causal_attention_counts_half_the_work():
    w = get_workload("charlm")
    stm = predict.step_time_model(w, "H100")
    causal = stm.work < 1
    assert causal.any()  # charlm's attention is causal: flash forward and backward
    assert all(n.startswith("_scaled_dot_product") for n, c in zip(predict.trace_ops(w, 2).names, causal) if c)


def test_predicted_curve_is_labelled_and_monotone():
    curve = predict.predicted_curve(_mlp(), "H100", [1, 8, 64, 512])
    assert predict.is_predicted(curve) and predict.is_predicted(curve.to_dict())
    assert curve.device == "H100 (predicted, not measured)" and "50%" in curve.peak_source
    sps = [p.samples_per_s for p in curve.points]
    assert sps == sorted(sps)
    assert all(p.micro_s + p.optimizer_s == pytest.approx(p.step_s) for p in curve.points)
    assert all(0 < p.mfu < predict.MATMUL_EFFICIENCY for p in curve.points)


def test_for_plan_predicts_only_for_an_absent_named_gpu():
    w = _mlp()
    measured = predict.predicted_curve(w, "A100", [8, 32])  # stands in for this CPU's curve
    curve, on = predict.for_plan(w, resolve_device("H100"), measured, "cpu", max_batch=256)
    assert on == "predicted" and curve.device.startswith("H100") and curve.batches[-1] == 256
    assert 32 in curve.batches  # the base batch
    for spec, on_device in ((resolve_device("cpu"), "cpu"), (resolve_device(None, "24GiB"), "cpu"),
                            (resolve_device("L40S"), "cpu"), (resolve_device("H100"), "cuda")):
        assert predict.for_plan(w, spec, measured, on_device, max_batch=256) == (measured, on_device)
    assert predict.plan_caveats(measured) and "PREDICTED for A100-80GB" in predict.plan_caveats(measured)[0]


def test_a_plan_for_an_absent_gpu_uses_and_marks_the_predicted_curve():
    from plan_fakes import fake_probe

    from batchpilot.plan import make_plan

    w = dataclasses.replace(get_workload("mnist1d-mlp", num_train=2000, num_val=200), base_batch=32)
    plan = make_plan(w, device="H100", probe=fake_probe(), throughput_budget_s=3, lr_check=False, threads=1)
    assert plan.throughput["device"] == "H100 (predicted, not measured)"
    assert any("PREDICTED for H100" in c for c in plan.caveats)
    assert not any("measured on this CPU" in c for c in plan.caveats)
    stm = predict.step_time_model(w, "H100")
    chosen = plan.micro_batch_per_rank
    assert plan.samples_per_s == pytest.approx(plan.global_batch / (plan.accumulation_steps * stm.predict(chosen).micro_s
                                                                   + stm.predict(chosen).optimizer_s), rel=0.05)


def test_cpu_model_runs_ops_in_turn():
    stm = predict.step_time_model(_mlp(), predict.cpu_model())
    p = stm.predict(32)
    compute_or_memory = p.compute_s + p.memory_s
    assert p.step_s == pytest.approx(compute_or_memory + p.launch_s, rel=1e-6)  # synchronous: the sum
    assert math.isfinite(p.step_s) and p.step_s > 0
