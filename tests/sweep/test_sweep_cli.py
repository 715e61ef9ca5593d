"""``batchpilot sweep`` end to end (in-process, small data): JSON, rerun, --out, --plan, bad input."""

from __future__ import annotations

import json

import pytest

from batchpilot.cli import main


SMALL = ["--workload", "mnist1d-mlp", "--workload-opt", "num_train=600", "--workload-opt", "num_val=200"]


def _sweep(capsys, *args):
    capsys.readouterr()
    rc = main(["sweep", *SMALL, *args])
    return rc, capsys.readouterr()


def test_sweep_json_then_rerun_reports_both_trials(tmp_path, capsys):
    db = str(tmp_path / "s.db")
    args = ["--batches", "32,128", "--max-epochs", "2", "--store", db, "--json", "--sharpness-samples", "64"]
    rc, cap = _sweep(capsys, *args)
    assert rc == 0, cap.err
    first = json.loads(cap.out)
    assert first["ran"] == 2 and first["skipped"] == 0
    assert sorted(t["batch"] for t in first["trials"]) == [32, 128]
    rc, cap = _sweep(capsys, *args)
    second = json.loads(cap.out)
    assert rc == 0 and second["ran"] == 0 and second["skipped"] == 2
    assert second["trials"] == first["trials"]
    assert [b["batch"] for b in second["analysis"]["batches"]] == [32, 128]


def test_sweep_out_dir_and_plan(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"workload": "mnist1d-mlp", "global_batch": 64, "micro_batch_per_rank": 32,
                                "accumulation_steps": 2, "world_size": 1, "lr": 0.1, "lr_rule": "linear", "warmup_steps": 2}))
    out = tmp_path / "out"
    rc, cap = _sweep(capsys, "--batches", "32,64,128", "--max-epochs", "1",
                     "--target", "val_acc>=0.15", "--store", str(tmp_path / "s.db"), "--plan", str(plan),
                     "--out", str(out), "--no-sharpness", "--evals-per-epoch", "4")
    assert rc == 0, cap.err
    assert "time_to_target(plan)/best" in cap.out
    data = json.loads((out / "sweep.json").read_text())
    plan_trials = [t for t in data["trials"] if t["tag"] == "plan"]
    assert len(plan_trials) == 1 and plan_trials[0]["micro_batch"] == 32 and plan_trials[0]["lr"] == 0.1
    assert data["analysis"]["plan"]["global_batch"] == 64 and data["analysis"]["plan"]["time_ratio"] > 0
    html = (out / "report.html").read_text()
    assert "time_to_target(plan)/best" in html
    # steps, examples and the gap rule; no sharpness plot under --no-sharpness (the report says so instead)
    assert html.count("<img") == 3 and "Not measured in this sweep (--no-sharpness" in html


@pytest.mark.parametrize("args, message", [
    (["--batches", "32,x"], "--batches"),
    (["--batches", "32,5000"], "larger than the training set"),
    (["--batches", "32", "--lr-multipliers", "1,-2"], "multipliers"),
    (["--batches", "32", "--plan", "/nonexistent/plan.json"], "does not exist"),
    (["--batches", "32", "--target", "acc"], "target"),
    (["--batches", "32", "--seeds", "0"], "seeds"),
])
def test_bad_input_exits_2(tmp_path, capsys, args, message):
    rc, cap = _sweep(capsys, *args, "--store", str(tmp_path / "s.db"))
    assert rc == 2
    assert message in cap.err and "Traceback" not in cap.err
