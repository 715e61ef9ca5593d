"""Batch-size schedules: pure functions, Smith et al.'s noise-scale bookkeeping, and the trainer
running them with epoch semantics, a consistent LR and a bit-identical resume."""

import json
import math

import pytest
import torch

from batchpilot import BatchpilotError
from batchpilot.scaling.batch_schedules import (BatchSchedule, exponential_ramp, linear_ramp, smith_schedule,
                                        step_ramp)
from batchpilot.workloads.data import EpochBatchSampler
from batchpilot.train import TrainConfig, Trainer


def test_ramps_hit_their_endpoints_and_are_monotone():
    for ramp in (linear_ramp, exponential_ramp):
        values = [ramp(t, start=32, end=512, duration=100) for t in range(0, 131)]
        assert values[0] == 32 and values[100] == 512 and values[-1] == 512
        assert all(a <= b for a, b in zip(values, values[1:]))
    assert linear_ramp(50, start=32, end=512, duration=100) == 272
    assert exponential_ramp(50, start=32, end=512, duration=100) == 128  # geometric midpoint sqrt(32*512)
    assert [step_ramp(t, start=32, factor=2, every=10, end=200) for t in (0, 9, 10, 25, 1000)] == [32, 32, 64, 128, 200]


def test_schedules_are_pure_functions_of_time():
    spec = BatchSchedule.parse("exp:start=16,end=256,over=40")
    times = list(range(60))
    forward = [spec.at(t, 0.0, 16) for t in times]
    backward = [spec.at(t, 0.0, 16) for t in reversed(times)][::-1]
    assert forward == backward
    epoch_spec = BatchSchedule.parse("smith:start=16,end=400,factor=5,milestones=1/2/3,unit=epoch")
    assert epoch_spec.at(999, 1.5, 16) == epoch_spec.at(0, 1.5, 16)  # an epoch schedule ignores the step


def test_smith_trades_lr_decay_for_batch_growth():
    # A step-decay schedule would divide the LR by 5 at each milestone. Smith et al. grow the batch instead,
    # so the SGD noise scale g ~ lr * N / B falls by the same factor 5 at every milestone.
    milestones = (10.0, 20.0, 30.0)
    noise = []
    for t in (0, 10, 20, 30):
        batch, lr_mult = smith_schedule(t, start=20, end=1000, factor=5, milestones=milestones)
        noise.append(lr_mult / batch)
    assert [smith_schedule(t, start=20, end=1000, factor=5, milestones=milestones)[0] for t in (0, 10, 20)] == [20, 100, 500]
    assert smith_schedule(20, start=20, end=1000, factor=5, milestones=milestones)[1] == 1.0  # LR untouched while growing
    batch, lr_mult = smith_schedule(30, start=20, end=1000, factor=5, milestones=milestones)
    assert batch == 1000 and lr_mult == pytest.approx(2 / 5)  # capped: x2 of batch, the other x2.5 as LR decay
    for a, b in zip(noise, noise[1:]):
        assert a / b == pytest.approx(5.0)


def test_parse_round_trip_and_errors():
    for text in ("linear:start=32,end=512,over=200,unit=step", "step:end=256,factor=2,every=50,unit=epoch",
                 "smith:start=8,end=800,factor=10,milestones=2/4,unit=epoch"):
        spec = BatchSchedule.parse(text)
        assert BatchSchedule.parse(str(spec)) == spec
    for bad, msg in (("cubic:end=8", "kinds"), ("linear:end=8", "over > 0"), ("linear:over=3", "needs end"),
                     ("linear:end=8,over=x", "key=number"), ("linear:end=8,over=2,speed=3", "unknown batch schedule key"),
                     ("linear:start=64,end=32,over=3", "start <= end"), ("smith:end=64,factor=2", "milestones"),
                     ("linear:end=64,over=3,unit=hour", "unit")):
        with pytest.raises(BatchpilotError, match=msg):
            BatchSchedule.parse(bad)
    with pytest.raises(BatchpilotError, match="either a batch schedule or adaptive"):
        TrainConfig(global_batch=32, batch_schedule="linear:end=64,over=3", adaptive=True)


def test_sampler_keeps_epoch_semantics_across_size_changes():
    sampler = EpochBatchSampler(1000, seed=4)
    sizes = [exponential_ramp(t, start=8, end=300, duration=12) for t in range(40)]
    seen, epochs = [], []
    for size in sizes:
        idx = sampler.next_batch(size)
        seen.append(idx)
        if sampler.offset == 0:  # an epoch just ended (its last batch may be ragged)
            epochs.append(torch.cat(seen))
            seen = []
    assert len(epochs) >= 3
    for epoch in epochs:
        assert torch.equal(torch.sort(epoch).values, torch.arange(1000))  # every sample exactly once


def _records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_trainer_follows_schedule_with_rule_scaled_lr(mlp_workload, tmp_path):
    cfg = TrainConfig(global_batch=32, epochs=2, batch_schedule="linear:end=128,over=6", seed=0)
    trainer = Trainer(mlp_workload, cfg, out_dir=tmp_path)
    r = trainer.run()
    recs = _records(tmp_path)
    spec = BatchSchedule.parse(cfg.batch_schedule)
    n = mlp_workload.num_train
    assert r.samples == 2 * n and r.batch_mode.startswith("schedule")
    for i, rec in enumerate(recs):
        planned = spec.at(i, 0.0, 32)[0]
        # the batch that ends an epoch (or the run's sample budget) is ragged, never dropped
        assert rec["batch"] == planned or (rec["batch"] < planned and rec["epoch"] == int(rec["epoch"]))
        # SGD: linear rule around the reference point (batch 32 at the run's LR)
        assert rec["lr"] == pytest.approx(trainer.lr * planned / 32)
    assert [list(x) for x in r.batch_sizes][0] == [1, 32] and r.batch_sizes[-1][1] == 128
    assert r.steps == len(recs) < math.ceil(2 * n / 32)  # fewer updates for the same samples


def test_smith_schedule_keeps_lr_while_batch_grows(mlp_workload, tmp_path):
    cfg = TrainConfig(global_batch=16, epochs=3, batch_schedule="smith:end=64,factor=2,milestones=1/2,unit=epoch")
    trainer = Trainer(mlp_workload, cfg, out_dir=tmp_path)
    trainer.run()
    recs = _records(tmp_path)
    assert {r["batch"] for r in recs if r["epoch"] < 1} >= {16}
    assert max(r["batch"] for r in recs) == 64
    assert all(r["lr"] == pytest.approx(trainer.lr) for r in recs)  # the batch grows instead of the LR decaying


def test_schedule_resume_is_bit_identical(mlp_workload, tmp_path):
    cfg = TrainConfig(global_batch=32, micro_batch_per_rank=16, epochs=2, warmup_steps=3, schedule="cosine",
                      batch_schedule="step:end=128,factor=2,every=4", seed=1, checkpoint_every=2)
    full = Trainer(mlp_workload, cfg, out_dir=tmp_path / "full")
    r_full = full.run()
    part = Trainer(mlp_workload, cfg, out_dir=tmp_path / "part")
    assert part.run(stop_after=7).status == "stopped"
    resumed = Trainer(mlp_workload, cfg, out_dir=tmp_path / "part", resume=True)
    r_res = resumed.run()
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()))
    assert r_res.batch_sizes == r_full.batch_sizes and r_res.final_train_loss == r_full.final_train_loss
    assert [r["step"] for r in _records(tmp_path / "part")] == list(range(1, r_full.steps + 1))
