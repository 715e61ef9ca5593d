"""The adaptive controller's throughput from its own steps (train/step_times.py, Pollux-style): the fit,
the warm-up and monitor-time exclusions, the extrapolation guard, and the driver deciding from fake step
times without a probe, across a state_dict round trip."""

import copy
import json
import math

import pytest

from batchpilot import BatchpilotError, get_workload
from batchpilot.train import TrainConfig, Trainer
from batchpilot.train import adaptive
from batchpilot.train.adaptive import AdaptiveDriver
from batchpilot.train.batching import micro_batch_for
from batchpilot.train.step_times import (EXTRAPOLATION_FACTOR, PER_SAMPLE_FLOOR, StepTimeFit, StepTimer,
                                         ThroughputTable, fit_step_times)

FIXED_S, PER_SAMPLE_S = 2e-3, 1e-5  # the fake machine: a plain step at B takes FIXED_S + PER_SAMPLE_S * B
FETCH_S, OPT_S, MONITOR_S = 2e-4, 8e-4, 5e-3  # (FIXED_S = FETCH_S + OPT_S + the forward/backward's own 1e-3)


def test_fit_recovers_fixed_and_per_sample_time_despite_outliers():
    times = {b: [FIXED_S + PER_SAMPLE_S * b] * 5 for b in (16, 32, 64, 128)}
    times[32] += [1.0, 2.0]  # two slow steps (a GC pause, another process): the median ignores them
    fit = fit_step_times(times)
    assert fit.fixed_s == pytest.approx(FIXED_S) and fit.per_sample_s == pytest.approx(PER_SAMPLE_S)
    assert fit.batches == (16, 32, 64, 128)
    assert fit.samples_per_s(256) == pytest.approx(256 / (FIXED_S + PER_SAMPLE_S * 256))
    two = fit_step_times({16: [FIXED_S + 16 * PER_SAMPLE_S], 32: [FIXED_S + 32 * PER_SAMPLE_S]})
    assert two.per_sample_s == pytest.approx(PER_SAMPLE_S)  # two sizes suffice (the micro-batch monitor's)
    assert fit_step_times({32: [1e-3, 2e-3]}) is None and fit_step_times({}) is None


def test_fit_keeps_both_terms_positive_and_the_per_sample_floor():
    flat = fit_step_times({16: [2e-3], 32: [1.9e-3]})  # noise made the larger batch look faster
    assert flat.per_sample_s == pytest.approx(PER_SAMPLE_FLOOR * 1.9e-3 / 32) and flat.fixed_s > 0
    steep = fit_step_times({16: [1e-3], 32: [3e-3]})  # intercept would be negative: through the origin
    assert steep.fixed_s == 0 and steep.per_sample_s > 0
    assert all(steep.predict_s(b) > 0 for b in (1, 4, 1024))


def test_extrapolation_guard():
    fit = StepTimeFit(1e-3, 1e-5, (16, 32), (1.16e-3, 1.32e-3))
    assert EXTRAPOLATION_FACTOR == 4
    assert [b for b in (2, 4, 8, 32, 64, 128, 256, 512) if fit.trusted(b)] == [4, 8, 32, 64, 128]


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _step(timer_or_drv, clock, sizes, monitor_s=0.0):
    """One fake step through the timer's marks (the trainer's hook order)."""
    timer = timer_or_drv
    timer.start()
    clock.t += FETCH_S
    timer.fetched()
    for m in sizes:
        clock.t += 1e-3 + PER_SAMPLE_S * m
        timer.micro_done()
        clock.t += monitor_s
        timer.hook_done()
    clock.t += OPT_S


def test_step_timer_records_plain_steps_and_drops_warm_up_and_monitor_time():
    clock = _Clock()
    timer = StepTimer(clock)
    for k in range(6):  # every 3rd step split in two, with monitor work after each backward
        split = k % 3 == 0
        _step(timer, clock, [16, 16] if split else [32], MONITOR_S if split else 0.0)
        timer.end(32, [16, 16] if split else [32], whole=not split, split=split)
    # step 0: first step at a new batch; the first time at each size: warm-up, dropped
    assert sorted(timer.times) == [16, 32] and len(timer.times[32]) == 3 and len(timer.times[16]) == 2
    for b, ts in timer.times.items():
        assert ts == pytest.approx([FIXED_S + PER_SAMPLE_S * b] * len(ts))  # no monitor time in them
    timer.start()  # a step that never ends (rolled back) leaves nothing behind after a state round trip
    restored = StepTimer(clock)
    restored.load_state_dict(json.loads(json.dumps(timer.state_dict())))
    assert restored.times == timer.times and restored.state_dict() == timer.state_dict()
    restored.end(64, [64], whole=True, split=False)  # no start since the load: nothing recorded
    assert restored.times == timer.times


class _Monitor:
    """A micro-batch monitor with scripted noise scales; its work costs MONITOR_S on the fake clock."""

    needs_accumulation = True

    def __init__(self, clock, values):
        self.clock, self.values, self.n_updates, self.calls = clock, values, 0, 0

    def attach(self, model_fn):
        pass

    def after_micro(self, index, units):
        self.clock.t += MONITOR_S

    def end_step(self):
        self.n_updates += 1

    def estimate(self, recent=None):
        from types import SimpleNamespace
        b = self.values[self.calls % len(self.values)]
        self.calls += 1
        return SimpleNamespace(b_simple=b, b_simple_low=b, b_simple_high=b)

    def state_dict(self):
        return {"n": self.n_updates, "calls": self.calls}

    def load_state_dict(self, state):
        self.n_updates, self.calls = state["n"], state["calls"]


_COMMON = dict(ref_batch=32, rule="sqrt", num_samples=100_000, budget_samples=10**7, schedule="constant",
               warmup_steps=0, micro_cap=None)


def _driver(clock, values=(1e9,)):
    return AdaptiveDriver(max_batch=512, monitor=_Monitor(clock, values), decide_every=8, min_updates=2,
                          clock=clock, **_COMMON)


def _train(drv, clock, start, stop, per_sample_s=PER_SAMPLE_S):
    """0-based steps ``start..stop-1`` through the driver's hooks, in the trainer's order."""
    for step in range(start, stop):
        batch, _ = drv.batch_at(step, 0)
        pieces = drv.min_micro_batches(step)
        micro = micro_batch_for(batch, None, pieces)
        sizes = [micro] * (batch // micro)
        clock.t += FETCH_S
        drv.before_accumulate()
        for i, m in enumerate(sizes):
            clock.t += 1e-3 + per_sample_s * m
            drv.after_micro(i, m)
        clock.t += OPT_S
        drv.after_step(step + 1, batch)


@pytest.fixture
def no_probe(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the probe ran")
    monkeypatch.setattr(adaptive, "measure_throughput", refuse)


def test_driver_grows_within_the_guard_from_its_own_step_times(no_probe):
    """A large noise scale: goodput is throughput, so the largest candidate the model trusts wins. At the
    first decision only 16 and 32 are timed, so it stops at 128 (4x); from there 512 is trusted."""
    clock = _Clock()
    drv = _driver(clock)
    _train(drv, clock, 0, 24)
    assert [(d["step"], d["current"], d["batch"]) for d in drv.decisions] == [(8, 32, 128), (16, 128, 512), (24, 512, 512)]
    assert drv.decisions[1]["fixed_s"] == pytest.approx(FIXED_S) and drv.decisions[1]["per_sample_s"] == pytest.approx(PER_SAMPLE_S)
    assert drv.probed == [] and drv.probe_s == 0 and drv.throughput is None
    assert sorted(drv.step_timer.times) == [16, 32, 64, 128, 256, 512]


def test_driver_shrinks_for_a_small_noise_scale(no_probe):
    """B_noise = 2 and a per-sample time of 0.1 ms: goodput is highest at 8 (9.7k against 6.2k at 32)."""
    clock = _Clock()
    drv = _driver(clock, values=(2.0,))
    _train(drv, clock, 0, 9, per_sample_s=1e-4)
    assert drv.decisions[0]["batch"] == 8 and drv.decisions[0]["per_sample_s"] == pytest.approx(1e-4)


def test_resumed_driver_decides_as_the_uninterrupted_one(no_probe):
    values = (1e9, 1e9, 20.0, 3.0, 1e9)
    clock = _Clock()
    full = _driver(clock, values)
    _train(full, clock, 0, 60)
    clock2 = _Clock()
    part = _driver(clock2, values)
    _train(part, clock2, 0, 29)
    state = json.loads(json.dumps(part.state_dict()))  # plain data (the checkpoint)
    clock3 = _Clock()
    clock3.t = 7.0  # another process: another origin, the same step times
    resumed = _driver(clock3, values)
    resumed.load_state_dict(copy.deepcopy(state))
    _train(resumed, clock3, 29, 60)
    assert len({d["batch"] for d in full.decisions}) > 2  # it did move around
    assert [(d["step"], d["batch"]) for d in resumed.decisions] == [(d["step"], d["batch"]) for d in full.decisions]
    for a, b in zip(resumed.decisions, full.decisions):
        assert a["per_sample_s"] == pytest.approx(b["per_sample_s"]) and a["fixed_s"] == pytest.approx(b["fixed_s"])
    assert resumed.step_timer.times.keys() == full.step_timer.times.keys()


def test_unsplit_monitor_probes_only_the_neighbouring_candidates(monkeypatch):
    """Per-example monitor, every step observed: no plain step is timed, so the first decision probes the
    current batch and its two neighbours, once."""
    calls = []

    def fake_probe(workload, model, batches, micro_for, dtype):
        calls.append(list(batches))
        return ThroughputTable(tuple(batches), tuple(b / (FIXED_S + PER_SAMPLE_S * b) for b in batches))

    monkeypatch.setattr(adaptive, "measure_throughput", fake_probe)
    clock = _Clock()
    mon = _Monitor(clock, (1e9,))
    mon.needs_accumulation = False
    drv = AdaptiveDriver(max_batch=512, monitor=mon, decide_every=8, min_updates=2, monitor_every=1, clock=clock,
                         **_COMMON)
    drv.bind(lambda: None, object(), None, "adam")
    _train(drv, clock, 0, 24)
    assert calls == [[16, 32, 64]] and drv.probed == [16, 32, 64]
    # 4x above the largest size probed; with every step observed (hooks on) 256 is never timed plainly,
    # so the guard keeps it there
    assert [d["batch"] for d in drv.decisions] == [256, 256, 256]


def test_probe_mode_still_probes_every_candidate(monkeypatch):
    calls = []
    monkeypatch.setattr(adaptive, "measure_throughput", lambda w, m, batches, *a: (
        calls.append(list(batches)), ThroughputTable(tuple(batches), tuple(1000.0 * b for b in batches)))[1])
    clock = _Clock()
    drv = AdaptiveDriver(max_batch=512, monitor=_Monitor(clock, (1e9,)), decide_every=8, min_updates=2,
                         throughput="probe", clock=clock, **_COMMON)
    drv.bind(lambda: None, object(), None, "adam")
    _train(drv, clock, 0, 9)
    assert calls == [list(drv.candidates)] and drv.step_timer.times == {}
    with pytest.raises(BatchpilotError, match="throughput must be one of"):
        AdaptiveDriver(max_batch=64, monitor=_Monitor(clock, (1.0,)), throughput="table", **_COMMON)
    with pytest.raises(BatchpilotError, match="adaptive throughput must be"):
        TrainConfig(global_batch=32, adaptive=True, adaptive_throughput="table")


def test_trainer_times_its_own_steps_without_a_probe(monkeypatch):
    """The real trainer: the default controller fits its model to the steps it runs (never the probe);
    evaluation is outside the timed steps."""
    def refuse(*a, **k):
        raise AssertionError("the probe ran")
    monkeypatch.setattr(adaptive, "measure_throughput", refuse)
    w = get_workload("mnist1d-mlp", num_train=1000, num_val=200)
    cfg = TrainConfig(global_batch=32, adaptive=True, max_batch=256, steps=40, seed=0, eval_every=1)
    trainer = Trainer(w, cfg)
    trainer.run()
    drv = trainer.batching
    assert drv.throughput_mode == "steps" and drv.probed == [] and drv.probe_s == 0
    assert drv.decisions and all(d["per_sample_s"] > 0 and d["fixed_s"] >= 0 for d in drv.decisions)
    assert {16, 32} <= set(drv.step_timer.times)
    # a step of this MLP takes milliseconds; an evaluation of 200 samples inside a timed step would show
    assert all(0 < t < 0.5 and math.isfinite(t) for ts in drv.step_timer.times.values() for t in ts)
