"""Checkpoints: a run stopped at step k and resumed ends bit-identical to an uninterrupted run."""

import json

import pytest
import torch

from batchpilot import BatchpilotError, get_workload
from batchpilot.train import TrainConfig, Trainer
from batchpilot.train.checkpoint import load_checkpoint


def _states_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", ["mnist1d-mlp", "mnist1d-cnn"])
def test_stop_and_resume_is_bit_identical(name, tmp_path):
    w = get_workload(name, num_train=600, num_val=200)
    # 600 / 64 -> epochs end mid-run; cosine + warmup + EMA + clipping + accumulation all carry state.
    cfg = TrainConfig(global_batch=64, micro_batch_per_rank=16, steps=23, warmup_steps=5, schedule="cosine",
                      ema_decay=0.9, grad_clip=1.0, seed=3, checkpoint_every=4)
    full = Trainer(w, cfg, out_dir=tmp_path / "full")
    r_full = full.run()

    part = Trainer(w, cfg, out_dir=tmp_path / "part")
    r_stop = part.run(stop_after=13)
    assert r_stop.status == "stopped" and r_stop.steps == 13
    resumed = Trainer(w, cfg, out_dir=tmp_path / "part", resume=True)
    r_res = resumed.run()
    assert r_res.status == "completed" and r_res.steps == 23
    assert _states_equal(resumed.model, full.model)
    assert _states_equal(resumed.ema, full.ema)
    assert r_res.final_train_loss == r_full.final_train_loss
    assert r_res.samples == r_full.samples
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 24))  # no step lost or logged twice


def test_resume_from_periodic_checkpoint_after_crash(mlp_workload, tmp_path):
    cfg = TrainConfig(global_batch=32, steps=12, seed=0, checkpoint_every=5)
    full = Trainer(mlp_workload, cfg, out_dir=tmp_path / "full")
    full.run()

    class Crash(Exception):
        pass

    def crash_at_8(record):
        if record["step"] == 8:
            raise Crash

    with pytest.raises(Crash):
        Trainer(mlp_workload, cfg, out_dir=tmp_path / "part", on_step=crash_at_8).run()
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["counters"]["step"] == 5
    resumed = Trainer(mlp_workload, cfg, out_dir=tmp_path / "part", resume=True)
    resumed.run()
    assert _states_equal(resumed.model, full.model)


def test_checkpoint_loads_weights_only(mlp_workload, tmp_path):
    Trainer(mlp_workload, TrainConfig(global_batch=32, steps=2, ema_decay=0.5), out_dir=tmp_path).run()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["counters"]["step"] == 2


def test_resume_with_different_run_is_refused(mlp_workload, tmp_path):
    Trainer(mlp_workload, TrainConfig(global_batch=32, steps=2), out_dir=tmp_path).run()
    with pytest.raises(BatchpilotError, match="differs in: global_batch"):
        Trainer(mlp_workload, TrainConfig(global_batch=64, steps=4), out_dir=tmp_path, resume=True).run()


def test_resuming_a_run_that_reached_its_target_takes_no_step(mlp_workload, tmp_path):
    cfg = TrainConfig(global_batch=32, steps=200, eval_every=5, target="val_acc>=0.3", stop_at_target=True, seed=0)
    first = Trainer(mlp_workload, cfg, out_dir=tmp_path).run()
    assert first.status == "target_reached" and first.steps < 200
    again = Trainer(mlp_workload, cfg, out_dir=tmp_path, resume=True).run()
    assert (again.status, again.steps, again.samples) == ("target_reached", first.steps, first.samples)
