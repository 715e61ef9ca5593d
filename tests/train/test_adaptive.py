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
    assert all(32 <= b <= 256 for _, b in r.batch_sizes) and r.batch_sizes[0] == (1, 32)
    recs = _records(tmp_path)
    assert all(rec["batch"] <= 256 for rec in recs)
    assert calls.count(0) == r.steps  # the user's hook still runs, once per micro-batch
    assert drv.monitor.n_updates >= (r.steps - 1) // drv.monitor_every  # every monitored step had 2 micro-batches
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
                                                   ("micro-batch", 4, True), ("per-example", None, False)])
def test_estimators_observe_the_steps_they_should(cnn_workload, estimator, every, split):
    """Per-example: the monitored steps run unsplit and the hooks compute nothing on the others;
    micro-batch: the monitored steps are split in two."""
    from batchpilot.noise.per_example import PerExampleNoiseScale, _NormRule, _LinearRule

    micros: list[tuple[int, int]] = []  # (step, micro-batch index) of every backward
    steps = [0]
    cfg = TrainConfig(global_batch=32, adaptive=True, max_batch=64, steps=12, seed=0, adaptive_estimator=estimator)
    trainer = Trainer(cnn_workload, cfg, after_micro=lambda i, u: micros.append((steps[0], i)),
                      on_step=lambda rec: steps.__setitem__(0, steps[0] + 1))
    drv = trainer.batching
    if every is not None:
        drv.monitor_every, drv.backoff = every, False
    else:  # the default schedule: every step, doubling after each decision that keeps the batch
        assert drv.backoff and drv.monitor_every == 1
        drv.decide_every, drv.min_updates, drv.max_monitor_every = 2, 2, 4
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
        assert max(gaps) > 1 and observed[0] == 0
    split_steps = sorted({s for s, i in micros if i == 1})
    assert split_steps == (observed if split else [])
    assert drv.monitor.n_updates == len(observed)
    if estimator == "per-example":
        assert sorted(set(norms_at)) == observed  # no norms on the steps it skips
