"""Kill a rank mid-run: torchrun restarts the ranks and training resumes from rank 0's latest checkpoint.

Rank 1 SIGKILLs itself after step 7 of the first attempt (``BATCHPILOT_FAULT_KILL=1:7``); checkpoints are
every 5 steps, so steps 6-7 are lost with the attempt and redone. The run must end where an
uninterrupted run ends: nothing lost, nothing applied twice.
"""

import json

import pytest
import torch

from batchpilot import get_workload
from batchpilot.train import TrainConfig, Trainer
from batchpilot.train.checkpoint import load_checkpoint
from ddp_launch import json_out, torchrun

ARGS = ["-m", "batchpilot", "train", "--workload", "mnist1d-mlp", "--workload-opt", "num_train=600",
        "--workload-opt", "num_val=200", "--batch", "64", "--micro-batch", "16", "--steps", "12", "--dtype", "float64",
        "--checkpoint-every", "5", "--seed", "0", "--json"]


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _killed_run(out):
    # one restart is needed; a second is allowed because a restarted attempt's rank once aborted in gloo's C++
    # (std::terminate, mid-run; 1 of 9 runs on the shared CPU, cause not found): the run then resumes again,
    # and every assertion below still holds (nothing lost, nothing applied twice)
    proc = torchrun([*ARGS, "--out", str(out)], max_restarts=2, env={"BATCHPILOT_FAULT_KILL": "1:7"})
    assert "fault injection: rank 1 kills itself after step 7" in proc.stderr
    return proc


def test_killed_rank_restarts_and_resumes_with_nothing_lost(tmp_path):
    out = tmp_path / "killed"
    summary = json_out(_killed_run(out))
    assert summary["status"] == "completed" and summary["steps"] == 12 and summary["world_size"] == 2
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # steps 6-7 of the lost attempt were dropped, then redone once

    single = Trainer(get_workload("mnist1d-mlp", num_train=600, num_val=200),
                     TrainConfig(global_batch=64, steps=12, seed=0, dtype="float64"))
    r = single.run()  # the uninterrupted run at the same global batch
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["counters"]["step"] == 12 and state["counters"]["samples"] == r.samples
    assert _max_diff(state["model"], single.model.state_dict()) < 1e-10
    assert summary["final_train_loss"] == pytest.approx(r.final_train_loss, rel=1e-10)
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temporary behind


@pytest.mark.slow
def test_killed_run_is_bit_identical_to_an_uninterrupted_ddp_run(tmp_path):
    _killed_run(tmp_path / "killed")
    json_out(torchrun([*ARGS, "--out", str(tmp_path / "whole")]))
    a = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["rng_cpu_ranks"], b["rng_cpu_ranks"]))
