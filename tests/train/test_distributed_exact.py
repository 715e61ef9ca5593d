"""DDP under torchrun (2 gloo ranks) equals one process at the same global batch, in float64, no BN.

Accumulation (``no_sync``), a ragged last batch of an epoch (600 = 9 x 64 + 24), warmup, cosine,
clipping and EMA are all on; the weights must agree to ~1e-10.
"""

import json

import torch

from batchpilot import get_workload
from batchpilot.train import TrainConfig, Trainer
from batchpilot.train.checkpoint import load_checkpoint
from ddp_launch import json_out, torchrun

COMMON = dict(global_batch=64, steps=12, warmup_steps=3, schedule="cosine", grad_clip=1.0, ema_decay=0.9, seed=3,
              dtype="float64")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_two_ranks_with_accumulation_equal_one_process(tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun(["-m", "batchpilot", "train", "--workload", "mnist1d-mlp", "--workload-opt", "num_train=600",
                     "--workload-opt", "num_val=200", "--batch", "64", "--micro-batch", "16", "--steps", "12",
                     "--warmup-steps", "3", "--schedule", "cosine", "--grad-clip", "1.0", "--ema", "0.9",
                     "--seed", "3", "--dtype", "float64", "--out", str(out), "--json"])
    summary = json_out(proc)  # one JSON document: only rank 0 printed
    assert summary["world_size"] == 2 and summary["accumulation_steps"] == 2 and summary["micro_batch_per_rank"] == 16
    assert summary["status"] == "completed" and summary["samples"] == 12 * 64 - 40  # the ragged batch is exact

    w = get_workload("mnist1d-mlp", num_train=600, num_val=200)
    single = Trainer(w, TrainConfig(**COMMON))  # one batch of 64, no accumulation
    r = single.run()
    state = load_checkpoint(out / "checkpoint.pt")
    assert _max_diff(state["model"], single.model.state_dict()) < 1e-10
    assert _max_diff(state["ema"], single.ema.state_dict()) < 1e-10
    assert abs(summary["final_train_loss"] - r.final_train_loss) < 1e-10 * abs(r.final_train_loss)
    assert abs(summary["val_metric"] - r.val_metric) < 1e-12
    lines = (out / "metrics.jsonl").read_text().splitlines()  # rank 0 alone writes: one line per step
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 13))
    assert len(state["rng_cpu_ranks"]) == 2 and state["counters"]["step"] == 12
    # the test can fail: the same run at another seed is far away
    other = Trainer(w, TrainConfig(**{**COMMON, "seed": 4}))
    other.run()
    assert _max_diff(state["model"], other.model.state_dict()) > 1e-3
