"""The gradient noise scale monitor: exactness of the estimators and the trainer hook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

from batchpilot.errors import BatchpilotError
from batchpilot.noise.microbatch import GradientNoiseScale, grad_sq_norm, two_batch_estimates
from batchpilot.train import TrainConfig, Trainer, accumulate_gradients
from batchpilot.workloads import Workload

N = 8192


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 10, generator=g)
    w = torch.randn(10, 3, generator=g)
    y = (x @ w + 1.5 * torch.randn(N, 3, generator=g)).argmax(1)
    return x, y


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))


def _ce_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def exact_b_simple(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """tr(Σ)/|G|² over the whole dataset from per-sample gradients (torch.func.vmap)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([v.reshape(len(x), -1) for v in per_sample.values()], 1).double()
    mean = flat.mean(0)
    trace_sigma = ((flat - mean) ** 2).sum(1).mean()
    return float(trace_sigma / (mean @ mean))


def test_two_batch_estimators_are_unbiased_on_synthetic_gradients():
    rng = np.random.default_rng(1)
    dim, b_small, k = 50, 4, 8
    G = rng.normal(size=dim)
    sigma = 3.0  # per-unit noise std per coordinate: tr(Σ) = dim * 9
    gs, ss = [], []
    for _ in range(4000):
        units = G + sigma * rng.normal(size=(b_small * k, dim))
        micro = units.reshape(k, b_small, dim).mean(1)
        big = units.mean(0)
        g_sq, tr = two_batch_estimates([float(m @ m) for m in micro], float(big @ big), b_small, b_small * k)
        gs.append(g_sq)
        ss.append(tr)
    assert np.mean(gs) == pytest.approx(G @ G, rel=0.05)
    assert np.mean(ss) == pytest.approx(dim * sigma**2, rel=0.05)


def test_unequal_micro_batches_stay_unbiased():
    rng = np.random.default_rng(2)
    dim, sizes = 20, [2, 6, 3, 5]
    G = rng.normal(size=dim)
    gs, ss = [], []
    for _ in range(6000):
        micro = [G + 2.0 * rng.normal(size=(b, dim)) for b in sizes]
        big = np.concatenate(micro).mean(0)
        g_sq, tr = two_batch_estimates([float(m.mean(0) @ m.mean(0)) for m in micro], float(big @ big), sizes, sum(sizes))
        gs.append(g_sq)
        ss.append(tr)
    assert np.mean(ss) == pytest.approx(dim * 4.0, rel=0.05)
    assert np.mean(gs) == pytest.approx(G @ G, rel=0.1)


def test_monitor_in_trainer_matches_exact_b_simple_within_15_percent():
    x, y = _data()
    torch.manual_seed(0)
    exact = exact_b_simple(_model(), x, y)  # the trainer seeds 0 too, so it builds this very model
    workload = Workload(
        name="noise-test", make_model=_model, train_data=TensorDataset(x, y), val_data=TensorDataset(x[:64], y[:64]),
        loss_sum=_ce_sum, make_optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr), base_batch=64, base_lr=0.1,
    )
    # lr = 0 keeps the parameters (and so the true B_simple) fixed while the monitor samples batches
    config = TrainConfig(global_batch=64, micro_batch_per_rank=8, lr=0.0, steps=300, seed=0)
    monitor = GradientNoiseScale(ema_decay=0.995)
    trainer = Trainer(workload, config, after_micro=monitor.after_micro)
    monitor.attach(lambda: trainer.model)
    trainer.run()
    est = monitor.estimate()
    assert est.n_updates == 300
    assert est.b_simple == pytest.approx(exact, rel=0.15)
    assert est.b_simple_low <= est.b_simple_high
    assert est.b_simple_low > 0


def test_own_loop_update_api_matches_exact_and_never_touches_gradients():
    x, y = _data()
    torch.manual_seed(3)
    model = _model()
    exact = exact_b_simple(model, x, y)
    monitor = GradientNoiseScale(model, ema_decay=0.995)
    gen = torch.Generator().manual_seed(5)
    micro, k = 8, 8
    for step in range(300):
        idx = torch.randint(0, N, (micro * k,), generator=gen)
        model.zero_grad(set_to_none=True)
        small = []
        for part in idx.split(micro):  # plain per-micro mean gradients, no accumulation trick
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[part]), y[part]).backward()
            small.append(grad_sq_norm(model.parameters()))
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        monitor.update(small, grad_sq_norm(model.parameters()), micro, micro * k)
    assert monitor.estimate().b_simple == pytest.approx(exact, rel=0.15)


def test_hook_leaves_gradients_bit_identical_and_rng_alone():
    x, y = _data()
    torch.manual_seed(7)
    model = _model()
    micro_batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    accumulate_gradients(model, micro_batches, _ce_sum, lambda t: len(t))
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    monitor = GradientNoiseScale(model)
    rng_before = torch.get_rng_state()
    accumulate_gradients(model, micro_batches, _ce_sum, lambda t: len(t), after_micro=monitor.after_micro)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for a, p in zip(plain, model.parameters()):
        assert torch.equal(a, p.grad)
    monitor.end_step()
    assert monitor.n_updates == 1


def test_hook_recovers_micro_gradients_exactly():
    """Differencing snapshots and undoing the 1/T scaling gives each micro-batch's mean gradient."""
    x, y = _data()
    torch.manual_seed(8)
    model = _model().double()
    xd = x.double()
    sizes = [5, 11, 7]
    starts = np.cumsum([0] + sizes)
    micro_batches = [(xd[a:b], y[a:b]) for a, b in zip(starts[:-1], starts[1:])]
    expected_small = []
    for mx, my in micro_batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(mx), my).backward()
        expected_small.append(grad_sq_norm(model.parameters()))
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(xd[: starts[-1]]), y[: starts[-1]]).backward()
    expected = two_batch_estimates(expected_small, grad_sq_norm(model.parameters()), sizes, sum(sizes))
    model.zero_grad(set_to_none=True)
    monitor = GradientNoiseScale(model)
    accumulate_gradients(model, micro_batches, _ce_sum, lambda t: len(t), after_micro=monitor.after_micro)
    got = monitor.end_step()
    assert got == pytest.approx(expected, rel=1e-9)


def test_no_accumulation_gives_no_estimate_and_bad_input_is_rejected():
    model = _model()
    monitor = GradientNoiseScale(model)
    est = monitor.estimate()
    assert est.n_updates == 0 and math.isnan(est.b_simple)
    with pytest.raises(BatchpilotError):
        two_batch_estimates([1.0], 1.0, 8, 8)  # no second batch size
    with pytest.raises(BatchpilotError):
        two_batch_estimates([], 1.0, 8, 16)
    with pytest.raises(BatchpilotError):
        GradientNoiseScale(ema_decay=1.0)
    with pytest.raises(BatchpilotError):
        GradientNoiseScale().after_micro(0, 8)  # nothing attached
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    monitor.after_micro(0, 8)
    monitor.reset()
    monitor.after_micro(1, 8)  # micro-batch 0 not seen: the step cannot be decomposed and is skipped
    monitor.after_micro(2, 8)
    assert monitor.end_step() is None and monitor.n_updates == 0


def test_spread_shrinks_with_a_longer_window():
    rng = np.random.default_rng(4)
    G = rng.normal(size=30)

    def feed(monitor, steps):
        for _ in range(steps):
            units = G + 2.0 * rng.normal(size=(64, 30))
            micro = units.reshape(8, 8, 30).mean(1)
            big = units.mean(0)
            monitor.update([float(m @ m) for m in micro], float(big @ big), 8, 64)
        return monitor.estimate()

    short = feed(GradientNoiseScale(ema_decay=0.8), 30)
    long = feed(GradientNoiseScale(ema_decay=0.99), 300)
    assert long.b_simple_high - long.b_simple_low < short.b_simple_high - short.b_simple_low
    true = 30 * 4.0 / float(G @ G)
    assert long.b_simple_low < true * 1.2 and long.b_simple_high > true * 0.8
    for est in (short, long):  # the weighted bootstrap is centred on the EMA point estimate
        assert est.b_simple_low <= est.b_simple <= est.b_simple_high


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(6)

    def step_norms():
        units = 1.0 + 2.0 * rng.normal(size=(32, 5))
        micro = units.reshape(4, 8, 5).mean(1)
        return [float(m @ m) for m in micro], float(units.mean(0) @ units.mean(0))

    a = GradientNoiseScale(ema_decay=0.9)
    steps = [step_norms() for _ in range(30)]
    for small, big in steps[:20]:
        a.update(small, big, 8, 32)
    b = GradientNoiseScale(ema_decay=0.9)
    b.load_state_dict(a.state_dict())
    for small, big in steps[20:]:
        a.update(small, big, 8, 32)
        b.update(small, big, 8, 32)
    assert a.estimate() == b.estimate()
    with pytest.raises(BatchpilotError):
        GradientNoiseScale(ema_decay=0.5).load_state_dict(a.state_dict())


def test_recent_window_follows_a_falling_gradient_norm_that_the_ema_lags():
    """Early in training |G|² falls fast: the EMAs keep the early steps' large |G|² and read B_simple low
    long after; the window over the last steps reads the current ratio (here exactly, no noise)."""
    mon = GradientNoiseScale(confidence=0.5)
    trace_sigma = 100.0
    for k in range(40):  # |G|² falls from 1000 to 10 over 20 steps, then stays: B_simple goes 0.1 -> 10
        mon.add_estimate(max(10.0, 1000.0 * 0.79 ** k), trace_sigma)
    current = trace_sigma / 10.0
    ema = mon.estimate()
    win = mon.estimate(recent=8)
    assert ema.b_simple < 0.8 * current  # the lag this option exists for
    assert win.b_simple == pytest.approx(current, rel=1e-12)
    assert win.window == 8 and win.n_updates == 40
    assert win.b_simple_low == pytest.approx(current) and win.b_simple_high == pytest.approx(current)
    # a window longer than the history uses all of it, equal weights: the ratio of the plain means
    short = GradientNoiseScale()
    short.add_estimate(4.0, 8.0)
    short.add_estimate(2.0, 10.0)
    assert short.estimate(recent=50).b_simple == pytest.approx(18.0 / 6.0)
    with pytest.raises(BatchpilotError, match="recent"):
        short.estimate(recent=0)
