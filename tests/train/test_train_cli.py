"""The train command: JSON summary, exact accumulation end to end, one-line errors with exit 2."""

import json
import subprocess
import sys

import pytest

from batchpilot.cli import main
from batchpilot.errors import EXIT_DIVERGED, EXIT_USAGE

KEYS = {"status", "steps", "global_batch", "micro_batch_per_rank", "accumulation_steps", "world_size", "lr",
        "final_train_loss", "val_metric", "samples_per_s", "wall_s"}


def _run_json(capsys, *argv):
    code = main(["train", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_micro_batch_matches_full_batch_fp32(capsys):
    base = ["--workload", "mnist1d-mlp", "--batch", "256", "--steps", "30", "--seed", "0"]
    code1, acc = _run_json(capsys, *base, "--micro-batch", "32")
    code2, full = _run_json(capsys, *base)
    assert code1 == code2 == 0
    assert KEYS <= set(acc)
    assert (acc["accumulation_steps"], acc["micro_batch_per_rank"], acc["world_size"]) == (8, 32, 1)
    assert abs(acc["final_train_loss"] - full["final_train_loss"]) / full["final_train_loss"] < 1e-5


def test_out_dir_records(tmp_path, capsys):
    code, summary = _run_json(capsys, "--workload", "mnist1d-mlp", "--workload-opt", "num_train=600",
                              "--workload-opt", "num_val=200", "--steps", "5", "--out", str(tmp_path))
    assert code == 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1])["step"] == 5
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 5
    assert (tmp_path / "checkpoint.pt").exists()


def test_divergence_is_a_status_not_a_traceback(capsys):
    code, summary = _run_json(capsys, "--workload", "mnist1d-mlp", "--workload-opt", "num_train=600",
                              "--workload-opt", "num_val=200", "--lr", "1e6", "--steps", "20")
    assert code == EXIT_DIVERGED
    assert summary["status"] == "diverged"
    assert summary["steps"] < 20


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "batch must be a positive integer, got 0"),
    (["--batch", "-4"], "batch must be a positive integer, got -4"),
    (["--batch", "64", "--micro-batch", "24"], "micro-batch 24 does not divide the per-rank batch 64"),
    (["--lr", "-0.1"], "lr must be a finite number >= 0, got -0.1"),
    (["--steps", "0"], "steps must be a positive integer, got 0"),
    (["--workload", "nope"], "unknown workload 'nope'; known: charlm"),
    (["--batch", "5000"], "batch 5000 is larger than the training set"),
    (["--workload", "missing_file.py:make"], "workload file 'missing_file.py' does not exist"),
    (["--resume"], "--resume needs --out DIR"),
])
def test_bad_input_one_line_exit_2(argv, message, capsys):
    assert main(["train", *argv]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_console_script_module_entry():
    out = subprocess.run([sys.executable, "-m", "batchpilot", "train", "--batch", "0"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
