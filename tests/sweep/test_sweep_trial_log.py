"""``batchpilot sweep --log``: every trial logs its steps as its own run (TensorBoard, CSV)."""

from __future__ import annotations

import csv
import json

import pytest

from batchpilot.cli import main


def test_each_trial_is_its_own_run(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["sweep", "--workload", "mnist1d-mlp", "--workload-opt", "num_train=600", "--workload-opt", "num_val=200",
                 "--batches", "64,128", "--max-epochs", "1", "--no-sharpness", "--evals-per-epoch", "2",
                 "--store", str(tmp_path / "s.db"), "--out", str(out), "--log", "tensorboard", "--log", "csv", "--json"]) == 0
    trials = {t["batch"]: t for t in json.loads(capsys.readouterr().out)["trials"]}
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["b128-lrx1-s0-grid", "b64-lrx1-s0-grid"]
    for batch in (64, 128):
        run = out / "runs" / f"b{batch}-lrx1-s0-grid"
        acc = EventAccumulator(str(run / "tensorboard"))
        acc.Reload()
        loss = acc.Scalars("train/loss")
        assert [e.step for e in loss] == list(range(1, trials[batch]["steps"] + 1))
        assert acc.Scalars("val/acc")[-1].value == pytest.approx(trials[batch]["val_metric"], rel=1e-6)
        rows = list(csv.DictReader(open(run / "metrics.csv")))
        assert len(rows) == trials[batch]["steps"] and rows[0]["batch"] == str(batch)


def test_log_without_a_directory_is_one_line(tmp_path, capsys):
    capsys.readouterr()
    assert main(["sweep", "--workload", "mnist1d-mlp", "--batches", "64", "--store", str(tmp_path / "s.db"),
                 "--log", "csv"]) == 2
    assert "--log needs a directory" in capsys.readouterr().err
