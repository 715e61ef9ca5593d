"""The sweep runner: grid, keys, persistence, resume, failures, divergence, waiting on other processes."""

from __future__ import annotations

import threading
from types import SimpleNamespace
import time

import pytest

from batchpilot.cli.sweep_cmd import parse_batches
from batchpilot.errors import BatchpilotError
from batchpilot.sweep.store import TrialStore
from batchpilot.sweep.runner import SweepConfig, TrialSpec, run_sweep, run_trial, warmup_steps_for, with_plan_trial


def fake_workload():
    return SimpleNamespace(num_train=10**6)


def fake_execute(calls):
    def execute(workload, config, trial, on_step):
        calls.append(trial)
        on_step({"step": 1})
        return {"batch": trial.batch, "lr_multiplier": trial.lr_multiplier, "seed": trial.seed, "status": "completed"}
    return execute


def test_grid_order_keys_and_validation():
    cfg = SweepConfig(workload="w", batches=(32, 64), lr_multipliers=(0.5, 1.0), seeds=2)
    trials = cfg.trials()
    assert [(t.batch, t.lr_multiplier, t.seed) for t in trials][:3] == [(32, 0.5, 0), (32, 0.5, 1), (32, 1.0, 0)]
    assert len(trials) == 8
    keys = {cfg.trial_key(t) for t in trials}
    assert len(keys) == 8
    same = SweepConfig(workload="w", batches=(64, 32, 128), lr_multipliers=(1.0,), seeds=1)
    assert same.trial_key(TrialSpec(32)) == cfg.trial_key(TrialSpec(32))  # the grid's shape is not part of a trial's identity
    other = SweepConfig(workload="w", batches=(32,), max_epochs=3)
    assert other.trial_key(TrialSpec(32)) != cfg.trial_key(TrialSpec(32))
    for bad in (dict(batches=()), dict(batches=(0,)), dict(batches=(32, 32)), dict(batches=(32,), lr_multipliers=(0,)),
                dict(batches=(32,), seeds=0), dict(batches=(32,), target="acc=1"), dict(batches=(32,), max_epochs=0),
                dict(batches=(32,), lr_rule="cubic"), dict(batches=(32,), sharpness_mode="test")):
        with pytest.raises(BatchpilotError):
            SweepConfig(workload="w", **bad)


def test_parse_batches():
    assert parse_batches("16,32,...,1024") == (16, 32, 64, 128, 256, 512, 1024)
    assert parse_batches("8,32,...,512") == (8, 32, 128, 512)
    assert parse_batches("32, 128") == (32, 128)
    for bad in ("a,b", "16,...,64", "32,16,...,1024", "16,24,...,64"):
        with pytest.raises(BatchpilotError, match="--batches"):
            parse_batches(bad)


def test_resume_skips_done_trials_without_building_the_workload(tmp_path):
    cfg = SweepConfig(workload="w", batches=(32, 64, 128))
    calls, built = [], []
    with TrialStore(tmp_path / "s.db") as store:
        out = run_sweep(cfg, store, workload=lambda: built.append(1) or fake_workload(), execute=fake_execute(calls))
    assert out.ran == 3 and out.skipped == 0 and len(out.trials) == 3 and len(built) == 1
    calls2, built2 = [], []
    with TrialStore(tmp_path / "s.db") as store:
        out2 = run_sweep(cfg, store, workload=lambda: built2.append(1) or fake_workload(), execute=fake_execute(calls2))
    assert out2.ran == 0 and out2.skipped == 3 and calls2 == [] and built2 == []
    assert list(out2.trials) == list(out.trials)
    # a larger grid runs only the new trial
    bigger = SweepConfig(workload="w", batches=(32, 64, 128, 256))
    with TrialStore(tmp_path / "s.db") as store:
        out3 = run_sweep(bigger, store, workload=fake_workload, execute=fake_execute(calls2))
    assert out3.ran == 1 and [t.batch for t in calls2] == [256]


def test_a_crashed_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    cfg = SweepConfig(workload="w", batches=(32, 64, 128))
    calls = []

    def flaky(workload, config, trial, on_step):
        if trial.batch == 64:
            raise RuntimeError("boom")
        return fake_execute(calls)(workload, config, trial, on_step)

    with TrialStore(tmp_path / "s.db") as store:
        out = run_sweep(cfg, store, workload=fake_workload, execute=flaky)
        assert out.ran == 2 and len(out.failed) == 1 and "boom" in out.failed[0]["error"]
        assert store.get(cfg.trial_key(TrialSpec(64))).status == "failed"
        out2 = run_sweep(cfg, store, workload=fake_workload, execute=fake_execute(calls))
        assert out2.ran == 1 and out2.skipped == 2 and len(out2.trials) == 3


def test_interrupt_releases_the_trial(tmp_path):
    cfg = SweepConfig(workload="w", batches=(32,))

    def interrupted(workload, config, trial, on_step):
        raise KeyboardInterrupt

    with TrialStore(tmp_path / "s.db") as store:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(cfg, store, workload=fake_workload, execute=interrupted)
        assert store.get(cfg.trial_key(TrialSpec(32))).status == "failed"


def test_waits_for_a_trial_held_by_another_live_process_and_never_reruns_it(tmp_path):
    cfg = SweepConfig(workload="w", batches=(32, 64))
    db = tmp_path / "s.db"
    other = TrialStore(db)
    key64 = cfg.trial_key(TrialSpec(64))
    assert other.claim(key64, cfg.sweep_id, {}) == "claimed"
    calls = []
    result = {}

    def sweep():
        with TrialStore(db) as store:
            result["out"] = run_sweep(cfg, store, workload=fake_workload, execute=fake_execute(calls), poll_s=0.05)

    th = threading.Thread(target=sweep)
    th.start()
    time.sleep(0.5)
    assert th.is_alive()  # waiting on batch 64
    other.finish(key64, {"batch": 64, "by": "other"})
    th.join(timeout=10)
    out = result["out"]
    assert [t.batch for t in calls] == [32]
    assert out.ran == 1 and {"batch": 64, "by": "other"} in out.trials


def test_warmup_rule(mlp_workload):
    cfg = SweepConfig(workload="w", batches=(32,), warmup_epochs=0.5)
    n = mlp_workload.num_train
    assert warmup_steps_for(cfg, mlp_workload, 32, mlp_workload.base_lr) == 0  # no LR increase, no warmup
    assert warmup_steps_for(cfg, mlp_workload, 128, 4 * mlp_workload.base_lr) == round(0.5 * -(-n // 128))
    assert warmup_steps_for(SweepConfig(workload="w", batches=(32,), warmup_epochs=0), mlp_workload, 128, 1.0) == 0


def test_real_trial_measures_everything(mlp_workload):
    cfg = SweepConfig(workload="mnist1d-mlp", batches=(64,), max_epochs=2, target="val_acc>=0.15", sharpness_samples=64,
                      sharpness_iters=5, sharpness_probes=2, evals_per_epoch=4)
    steps = []
    r = run_trial(mlp_workload, cfg, TrialSpec(64, lr_multiplier=0.5), on_step=lambda rec: steps.append(rec["step"]))
    assert r["status"] == "completed" and not r["diverged"]
    assert r["lr"] == pytest.approx(0.05 * 64 / 32 * 0.5) and r["lr_rule"] == "linear"
    assert r["steps"] == 2 * -(-600 // 64) == steps[-1]
    assert r["steps_to_target"] is not None and r["steps_to_target"] % 2 == 0  # evaluated every 2 steps
    assert r["examples_to_target"] == 64 * r["steps_to_target"]
    assert 0 < r["time_to_target_s"] <= r["train_wall_s"]
    assert r["generalization_gap"] == pytest.approx(r["train_metric"] - r["val_metric"])
    s = r["sharpness"]
    assert s["mode"] == "eval" and s["num_samples"] == 64 and s["top_eigenvalue"] > 0 and s["trace"] is not None


def test_diverged_trial_is_a_result(mlp_workload, tmp_path):
    cfg = SweepConfig(workload="mnist1d-mlp", batches=(32,), lr_multipliers=(1.0, 400.0), max_epochs=1, warmup_epochs=0,
                      sharpness=False, evals_per_epoch=2)
    with TrialStore(tmp_path / "s.db") as store:
        out = run_sweep(cfg, store, workload=mlp_workload)
    by_mult = {t["lr_multiplier"]: t for t in out.trials}
    assert by_mult[400.0]["diverged"] and by_mult[400.0]["status"] == "diverged"
    assert by_mult[400.0]["val_metric"] is None and by_mult[400.0]["sharpness"] is None
    assert not by_mult[1.0]["diverged"] and out.failed == ()


def test_plan_trial():
    cfg = SweepConfig(workload="w", batches=(32, 64))
    cfg2, spec = with_plan_trial(cfg, {"global_batch": 64, "lr": 0.1, "warmup_steps": 5, "micro_batch_per_rank": 32})
    assert spec == TrialSpec(64, lr=0.1, warmup_steps=5, micro_batch=32, tag="plan")
    assert cfg2.trials()[-1] == spec and len(cfg2.trials()) == 3
    with pytest.raises(BatchpilotError, match="global_batch"):
        with_plan_trial(cfg, {"batch": 3})
