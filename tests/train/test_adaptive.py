"""The noise-adaptive batch controller: goodput formulas, bounds, the 5% margin, and the trainer
running it with the live noise monitor (batches reported, resume bit-identical)."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpilot import BatchpilotError, get_workload
from batchpilot.train.adaptive import (POLLUX_MARGIN, AdaptiveDriver, ThroughputTable, adascale_gain, candidate_batches,
                                 decide_batch, efficiency, goodput)
from batchpilot.train import TrainConfig, Trainer


def test_efficiency_and_adascale_gain_match_their_definitions():
    trace_sigma, g_sq, b0 = 300.0, 2.0, 32
    b_noise = trace_sigma / g_sq
    for batch in (32, 64, 256, 1024):
        s = batch / b0
        var, sqr = trace_sigma / b0, g_sq  # AdaScale's sigma^2 (at the base batch) and mu^2
        assert adascale_gain(batch, b_noise, b0) == pytest.approx((var + sqr) / (var / s + sqr))
        assert 1.0 <= adascale_gain(batch, b_noise, b0) <= s
    assert efficiency(b0, b_noise, b0) == 1.0
    assert efficiency(512, math.inf, b0) == 1.0
    # McCandlish et al.: steps S and samples E trade off as (S/Smin - 1)(E/Emin - 1) = 1, E(B) follows from it
    assert efficiency(b0 + b_noise, b_noise, b0) == pytest.approx((b_noise + b0) / (2 * b_noise + b0))


def test_candidates_stay_within_bounds():
    assert candidate_batches(32, 512) == (32, 64, 128, 256, 512)
    assert candidate_batches(32, 300) == (32, 64, 128, 256, 300)
    with pytest.raises(BatchpilotError):
        candidate_batches(64, 32)
    # below the base batch too, down to a floor (included)
    assert candidate_batches(32, 128, floor=4) == (4, 8, 16, 32, 64, 128)
    assert candidate_batches(32, 64, floor=5) == (5, 8, 16, 32, 64)
    assert candidate_batches(32, 64, floor=32) == (32, 64)
    with pytest.raises(BatchpilotError):
        candidate_batches(32, 64, floor=33)


def test_driver_candidates_reach_below_the_starting_batch():
    common = dict(ref_batch=32, rule="sqrt", num_samples=1000, budget_samples=2000, schedule="constant",
                  warmup_steps=0, micro_cap=None)
    drv = AdaptiveDriver(max_batch=128, **common)
    assert drv.min_batch == 4 and drv.candidates == (4, 8, 16, 32, 64, 128)  # default max(2, B0 // 8)
    assert AdaptiveDriver(max_batch=128, min_batch=32, **common).candidates == (32, 64, 128)  # grow-only, on request
    for bad in (0, 33, 1.5, True):
        with pytest.raises(BatchpilotError, match="min batch"):
            AdaptiveDriver(max_batch=128, min_batch=bad, **common)
    with pytest.raises(BatchpilotError, match="min batch"):  # the micro-batch monitor splits its steps in two
        AdaptiveDriver(max_batch=128, min_batch=1, **common)
    assert AdaptiveDriver(max_batch=128, min_batch=1, estimator="per-example", **common).candidates[0] == 1
    with pytest.raises(BatchpilotError, match="min batch 64 is above"):
        TrainConfig(global_batch=32, adaptive=True, min_batch=64)
    with pytest.raises(BatchpilotError, match="adaptive batching only"):
        TrainConfig(global_batch=32, min_batch=8)


# fake step times (ms): small batches nearly as fast per sample as the base batch, large ones faster
_NEAR_LINEAR = ThroughputTable((4, 8, 16, 32, 64, 128), tuple(b / t for b, t in
                                                             ((4, 4.6), (8, 8.8), (16, 17.0), (32, 33.0), (64, 48.0), (128, 80.0))))


def test_small_noise_scale_shrinks_the_batch():
    """A small B_noise (a fake monitor's reading) and small batches nearly as fast per sample: shrink."""
    cands = _NEAR_LINEAR.batches
    d = decide_batch(32, 2.0, _NEAR_LINEAR, cands, base_batch=32, b_noise_range=(1.0, 4.0))
    assert d.switched and d.batch < 32
    # and a large one grows it, from the same start
    d = decide_batch(32, 5000.0, _NEAR_LINEAR, cands, base_batch=32, b_noise_range=(3000.0, 8000.0))
    assert d.switched and d.batch == 128


def test_margin_prevents_flip_flopping_between_neighbours():
    """Where two batches' goodputs are within the margin, neither moves to the other, in either direction."""
    table = {16: 1000.0 / 1.03, 32: 1000.0}  # 16 a little slower per sample
    for b_noise in (300.0, 400.0, 600.0):
        gp16, gp32 = (goodput(b, b_noise, 32, table.__getitem__) for b in (16, 32))
        assert abs(gp16 / gp32 - 1) < POLLUX_MARGIN
        assert decide_batch(32, b_noise, table, (16, 32), 32).batch == 32
        assert decide_batch(16, b_noise, table, (16, 32), 32).batch == 16


class _FakeMonitor:
    """Reports a noise scale in samples (cycling through ``values``, one per estimate) with an interval
    ``[b / spread, b * spread]``; counts nothing."""

    needs_accumulation = True

    def __init__(self, *values: float, spread: float = 1.5) -> None:
        self.values, self.spread, self.n_updates, self.calls = values, spread, 0, 0

    def attach(self, model_fn):
        pass

    def after_micro(self, index, units):
        pass

    def end_step(self):
        self.n_updates += 1

    def estimate(self, recent=None):
        from types import SimpleNamespace
        b = self.values[self.calls % len(self.values)]
        self.calls += 1
        return SimpleNamespace(b_simple=b, b_simple_low=b / self.spread, b_simple_high=b * self.spread)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


_COMMON = dict(ref_batch=32, rule="sqrt", num_samples=10_000, budget_samples=100_000, schedule="constant",
               warmup_steps=0, micro_cap=None)


def _drive(drv: AdaptiveDriver, table: ThroughputTable, steps: int = 40) -> list[int]:
    """The batch after each of ``steps`` steps, deciding at every step (one unit per sample)."""
    drv.throughput, batches = table, []
    for step in range(1, steps):
        drv.min_micro_batches(step)
        drv.after_micro(0, drv.current)
        drv.after_step(step, drv.current)
        batches.append(drv.current)
    return batches


@pytest.mark.parametrize("b_noise,direction", [(2.0, -1), (5000.0, 1)])
def test_driver_moves_the_batch_the_way_the_noise_scale_says(b_noise, direction):
    """The driver with a fake monitor and fake step times: shrinks for a small B_noise, grows for a large
    one, once, with the AdaScale LR gain following in both directions."""
    drv = AdaptiveDriver(max_batch=128, monitor=_FakeMonitor(b_noise), decide_every=1, min_updates=1,
                         lr_mode="adascale", **_COMMON)
    batches = _drive(drv, _NEAR_LINEAR)
    switches = sum(1 for a, b in zip([32] + batches, batches) if a != b)
    assert switches == 1
    batch, gain = drv.batch_at(40, 0)
    if direction < 0:
        assert batch < 32 and batch / 32 < gain < 1  # AdaScale: the LR comes down, by less than the batch
    else:
        assert batch == 128 and 1 < gain < 4


def test_driver_margin_stops_flip_flopping_on_a_noisy_estimate():
    """A noise scale that alternates either side of a near-tie (16 vs 32): with no margin (and no
    interval) the batch flips at every decision; with Pollux's 5% it never moves."""
    table = ThroughputTable((4, 8, 16, 32, 64, 128), (500.0, 700.0, 1000.0 / 1.03, 1000.0, 1040.0, 1060.0))
    flappy = AdaptiveDriver(max_batch=128, monitor=_FakeMonitor(250.0, 600.0, spread=1.0), decide_every=1,
                            min_updates=1, margin=0.0, **_COMMON)
    batches = _drive(flappy, table)
    assert sum(1 for a, b in zip(batches, batches[1:]) if a != b) > 10 and set(batches) == {16, 32}
    steady = AdaptiveDriver(max_batch=128, monitor=_FakeMonitor(250.0, 600.0, spread=1.0), decide_every=1,
                            min_updates=1, **_COMMON)
    assert set(_drive(steady, table)) == {32}


@settings(max_examples=200, deadline=None)
@given(current=st.sampled_from([32, 64, 128, 256, 512]), b_noise=st.floats(0, 1e5),
       speeds=st.lists(st.floats(10, 1e5), min_size=5, max_size=5))
def test_decision_respects_bounds_and_margin(current, b_noise, speeds):
    cands = (32, 64, 128, 256, 512)
    table = dict(zip(cands, speeds))
    d = decide_batch(current, b_noise, table, cands, base_batch=32)
    assert d.batch in cands
    gp = {b: goodput(b, b_noise, 32, table.__getitem__) for b in cands}
    if d.switched:
        assert d.batch != current and gp[d.batch] > (1 + POLLUX_MARGIN) * gp[current]
        assert gp[d.batch] == max(gp.values())
    else:
        assert d.batch == current and max(gp.values()) <= (1 + POLLUX_MARGIN) * gp[current] * (1 + 1e-12)


def test_five_percent_margin_is_the_threshold():
    cands = (32, 64)
    b_noise = 1e9  # efficiency ~1: goodput is the throughput
    assert not decide_batch(32, b_noise, {32: 1000.0, 64: 1049.0}, cands, 32).switched
    assert decide_batch(32, b_noise, {32: 1000.0, 64: 1051.0}, cands, 32).batch == 64
    assert decide_batch(32, b_noise, {32: 1000.0, 64: 1030.0}, cands, 32, margin=0.02).batch == 64


def test_switch_must_hold_at_the_cautious_end_of_the_interval():
    table = {32: 1000.0, 64: 1900.0, 128: 3400.0}
    cands = (32, 64, 128)
    # point estimate 1000 favours 128, but a noise scale of 5 (the interval's low end) would not
    assert decide_batch(32, 1000.0, table, cands, 32).batch == 128
    d = decide_batch(32, 1000.0, table, cands, 32, b_noise_range=(5.0, 5000.0))
    assert not d.switched and d.batch == 32 and d.b_noise_low == 5.0
    assert decide_batch(32, 1000.0, table, cands, 32, b_noise_range=(600.0, 5000.0)).batch == 128
    # moving down is checked at the high end
    assert decide_batch(128, 1.0, table, cands, 32).batch == 32
    assert decide_batch(128, 1.0, table, cands, 32, b_noise_range=(0.5, 900.0)).batch == 128
    assert decide_batch(128, 1.0, table, cands, 32, b_noise_range=(0.5, float("nan"))).batch == 128


def test_batch_grows_with_the_noise_scale():
    table = ThroughputTable((32, 64, 128, 256, 512), (1000.0, 1900.0, 3400.0, 5200.0, 6500.0))
    chosen = [decide_batch(32, b, table, table.batches, 32, margin=0.0).batch for b in (1, 30, 100, 300, 1000, 1e5)]
    assert chosen == sorted(chosen) and chosen[0] == 32 and chosen[-1] == 512
    assert decide_batch(64, float("nan"), table, table.batches, 32).batch == 64  # no estimate: no move


def test_throughput_table_interpolates_step_time():
    t = ThroughputTable((32, 128), (1000.0, 2000.0))  # step times 32 ms and 64 ms
    assert t(32) == pytest.approx(1000.0) and t(128) == pytest.approx(2000.0)
    assert t(80) == pytest.approx(80 / 0.048)
    with pytest.raises(BatchpilotError):
        ThroughputTable((64, 32), (1.0, 2.0))


@pytest.fixture(scope="module")
def cnn_workload():
    return get_workload("mnist1d-cnn", num_train=1000, num_val=200)


def _records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_trainer_adapts_within_bounds_and_reports_batches(cnn_workload, tmp_path):
    calls = []
    cfg = TrainConfig(global_batch=32, adaptive=True, max_batch=256, epochs=2, seed=0)
    trainer = Trainer(cnn_workload, cfg, out_dir=tmp_path, after_micro=lambda i, u: calls.append(i))
    r = trainer.run()
    drv = trainer.batching
    assert isinstance(drv, AdaptiveDriver) and r.batch_mode == "adaptive"
    assert r.samples == 2 * cnn_workload.num_train
    assert all(drv.min_batch <= b <= 256 for _, b in r.batch_sizes) and r.batch_sizes[0] == (1, 32)
    recs = _records(tmp_path)
    assert all(rec["batch"] <= 256 for rec in recs) and drv.min_batch == 4
    assert calls.count(0) == r.steps  # the user's hook still runs, once per micro-batch
    # every observed step had 2 micro-batches (an estimate each), and the first decision's 4 were observed
    assert drv.monitor.n_updates == len(drv.observed_steps) >= drv.min_updates
    assert drv.decisions and all(d["batch"] in drv.candidates for d in drv.decisions)
    # the batches the records show are the ones the decisions made (the last, ragged step aside)
    for (step, batch), nxt in zip(r.batch_sizes, list(r.batch_sizes[1:]) + [(r.steps + 1, None)]):
        assert all(rec["batch"] == batch for rec in recs[step - 1:nxt[0] - 1] if rec["epoch"] != int(rec["epoch"]))


def test_adascale_lr_follows_the_gain(mlp_workload, tmp_path):
    cfg = TrainConfig(global_batch=32, adaptive=True, max_batch=128, epochs=2, seed=0)
    trainer = Trainer(mlp_workload, cfg, out_dir=tmp_path)
    trainer.batching.decide_every = 3
    trainer.batching.throughput = ThroughputTable((32, 64, 128), (1000.0, 2500.0, 6000.0))  # no timing noise
    trainer.run()
    drv = trainer.batching
    assert drv.lr_mode == "adascale"  # SGD workload
    recs = _records(tmp_path)
    planned = {step: batch for step, batch in trainer.batching.changes}
    batch = None
    for rec in recs:  # the LR of each step is the run's LR times the gain at that step's batch and noise scale
        batch = planned.get(rec["step"], batch)
        b_noise = rec["b_noise"] if rec["b_noise"] is not None else 0.0
        assert rec["lr"] == pytest.approx(trainer.lr * adascale_gain(batch, b_noise, 32))
    assert len(planned) > 1
    # gain <= linear scaling (the ragged batch that ends an epoch keeps its step's planned LR)
    assert all(rec["lr"] <= trainer.lr * rec["batch"] / 32 * (1 + 1e-9) for rec in recs if rec["epoch"] != int(rec["epoch"]))
    assert any(rec["lr"] > trainer.lr for rec in recs)  # and the LR did grow with the batch


def test_adaptive_resume_is_bit_identical(cnn_workload, tmp_path):
    table = ThroughputTable((32, 64, 128), (1000.0, 2100.0, 4000.0))  # fixed: timing must not differ between runs
    cfg = TrainConfig(global_batch=32, adaptive=True, max_batch=128, epochs=2, seed=2, checkpoint_every=3)

    def make(out, resume=False):
        t = Trainer(cnn_workload, cfg, out_dir=out, resume=resume)
        t.batching.decide_every, t.batching.min_updates, t.batching.throughput = 4, 2, table
        return t

    full = make(tmp_path / "full")
    r_full = full.run()
    part = make(tmp_path / "part")
    assert part.run(stop_after=11).status == "stopped"
    resumed = make(tmp_path / "part", resume=True)
    r_res = resumed.run()
    assert len(r_full.batch_sizes) > 1  # the batch did change, so the state carried something
    assert r_res.batch_sizes == r_full.batch_sizes and r_res.final_train_loss == r_full.final_train_loss
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()))
    assert resumed.batching.decisions == full.batching.decisions


def test_adaptive_config_errors():
    with pytest.raises(BatchpilotError, match="max batch 16 is below"):
        TrainConfig(global_batch=32, adaptive=True, max_batch=16)
    with pytest.raises(BatchpilotError, match="adaptive batching only"):
        TrainConfig(global_batch=32, max_batch=64)


@pytest.mark.parametrize("estimator,every,split", [("per-example", 1, False), ("per-example", 3, False),
                                                   ("micro-batch", 4, True), ("per-example", None, False),
                                                   ("micro-batch", None, True)])
def test_estimators_observe_the_steps_they_should(cnn_workload, estimator, every, split):
    """Per-example: the monitored steps run unsplit and the hooks compute nothing on the others;
    micro-batch: the monitored steps are split in two."""
    from batchpilot.noise.per_example import PerExampleNoiseScale, _NormRule, _LinearRule

    micros: list[tuple[int, int]] = []  # (step, micro-batch index) of every backward
    steps = [0]
    n_steps = 40 if (estimator, every) == ("micro-batch", None) else 12
    cfg = TrainConfig(global_batch=32, adaptive=True, max_batch=64, steps=n_steps, seed=0, adaptive_estimator=estimator)
    trainer = Trainer(cnn_workload, cfg, after_micro=lambda i, u: micros.append((steps[0], i)),
                      on_step=lambda rec: steps.__setitem__(0, steps[0] + 1))
    drv = trainer.batching
    if every is not None:
        drv.monitor_every, drv.backoff = every, False
    else:  # the default schedule: every step (every 4th split), doubling after each decision that keeps the batch
        assert drv.backoff and drv.monitor_every == (1 if estimator == "per-example" else 4)
        drv.decide_every, drv.min_updates, drv.max_monitor_every = 2, 2, 2 * drv.monitor_every
    norms_at: list[int] = []
    if estimator == "per-example":
        assert isinstance(drv.monitor, PerExampleNoiseScale) and drv.per_example
        orig = drv.monitor._norms
        drv.monitor._norms = lambda *a: (norms_at.append(steps[0]), orig(*a))[1]
    r = trainer.run()
    observed = [s for s in range(r.steps) if s % every == 0] if every is not None else drv.observed_steps
    assert drv.observed_steps == observed
    if every is None:  # the interval grew while the batch stayed, and reset where it switched
        gaps = [b - a for a, b in zip(observed, observed[1:])]
        assert max(gaps) > (1 if estimator == "per-example" else 4) and observed[0] == 0
    split_steps = sorted({s for s, i in micros if i == 1})
    assert split_steps == (observed if split else [])
    assert drv.monitor.n_updates == len(observed)
    if estimator == "per-example":
        assert sorted(set(norms_at)) == observed  # no norms on the steps it skips


@pytest.mark.parametrize("window", [8, None])
def test_driver_reads_the_noise_scale_over_its_window_not_the_lagging_emas(window):
    """|G|² falls 100x over the first 20 observed steps (as early in training), then holds: the decision
    reads tr(Σ)/|G|² of the last ``window`` observed steps, which is the current ratio, while the EMAs
    over all steps still read it several times too low (what noise_window=None keeps)."""
    from batchpilot.noise.microbatch import GradientNoiseScale

    class Scripted(GradientNoiseScale):  # each observed step adds the next scripted (|G|², tr Σ) pair
        def __init__(self):
            super().__init__(confidence=0.5)
            self.k = 0

        def after_micro(self, index, units):  # no gradients here: the pairs are scripted
            pass

        def end_step(self):
            self.add_estimate(max(10.0, 1000.0 * 0.79 ** self.k), 1000.0)
            self.k += 1

    drv = AdaptiveDriver(max_batch=128, monitor=Scripted(), decide_every=1, min_updates=1, monitor_every=1,
                         noise_window=window,
                         **_COMMON)
    _drive(drv, _NEAR_LINEAR, steps=41)
    if window is None:
        assert drv.b_noise < 0.5 * 100.0
    else:
        assert drv.b_noise == pytest.approx(100.0, rel=1e-9)
    with pytest.raises(BatchpilotError, match="noise window"):
        AdaptiveDriver(max_batch=128, monitor=Scripted(), noise_window=1, **_COMMON)
