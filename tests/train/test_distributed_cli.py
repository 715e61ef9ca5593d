"""`batchpilot train --nproc 2` runs torchrun itself; the issue's must-show; launcher errors fail fast."""

import sys

import pytest

from batchpilot import get_workload
from batchpilot.cli import main
from batchpilot.train import TrainConfig, Trainer
from ddp_launch import json_out, run


def test_nproc_two_reports_world_size_two_and_the_single_process_loss():
    # the must-show (`--batch 64 --steps 20 --seed 0`), on a smaller training set to stay fast
    proc = run([sys.executable, "-m", "batchpilot", "train", "--nproc", "2", "--workload", "mnist1d-mlp",
                "--workload-opt", "num_train=600", "--batch", "64", "--steps", "20", "--seed", "0", "--json"])
    summary = json_out(proc)
    assert summary["world_size"] == 2 and summary["micro_batch_per_rank"] == 32 and summary["steps"] == 20
    single = Trainer(get_workload("mnist1d-mlp", num_train=600), TrainConfig(global_batch=64, steps=20, seed=0)).run()
    assert summary["final_train_loss"] == pytest.approx(single.final_train_loss, rel=1e-5)
    assert summary["final_train_loss"] != pytest.approx(2.3, rel=0.01)  # it trained


@pytest.mark.parametrize("argv,message", [
    (["--nproc", "2", "--batch", "63"], "does not divide over world size 2"),
    (["--nproc", "2", "--batch", "64", "--micro-batch", "24"], "micro-batch 24 does not divide"),
    (["--nproc", "2", "--max-restarts", "1"], "--max-restarts needs --out"),
    (["--nproc", "0"], "--nproc must be >= 1"),
])
def test_bad_launch_flags_fail_before_launching(argv, message, capsys):
    code = main(["train", "--workload", "mnist1d-mlp", "--workload-opt", "num_train=600", *argv])
    assert code == 2
    assert message in capsys.readouterr().err
