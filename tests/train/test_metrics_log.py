"""``batchpilot train --log tensorboard|csv|jsonl``: every step's loss, LR, batch and samples/s, the evaluations,
and the noise scale with its interval at every step it is measured, in files TensorBoard's own reader loads;
the run itself is unchanged by logging."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from batchpilot.cli import main

SMALL = ["train", "--workload", "mnist1d-mlp", "--workload-opt", "num_train=600", "--workload-opt", "num_val=200",
         "--batch", "64", "--micro-batch", "16", "--steps", "12", "--eval-every", "6", "--seed", "0", "--json"]


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_csv_and_jsonl_with_the_noise_scale_at_every_measured_step(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    capsys.readouterr()
    assert main([*SMALL, "--noise-scale", "--log", "tensorboard", "--log", "csv,jsonl", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    tb = _scalars(out / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == list(range(1, 13))
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [v for _, v in tb["train/batch_size"]] == [r["batch"] for r in records]  # 64, and the epoch's ragged end
    assert [v for _, v in tb["train/lr"]] == pytest.approx([r["lr"] for r in records])
    assert len(tb["train/samples_per_s"]) == 12 and all(v > 0 for _, v in tb["train/samples_per_s"])
    assert [s for s, _ in tb["val/loss"]] == [6, 12] and [s for s, _ in tb["val/acc"]] == [6, 12]
    noise_steps = [s for s, _ in tb["noise/b_simple"]]
    assert noise_steps == list(range(noise_steps[0], 13)) and noise_steps[0] <= 3  # every step once it has a value
    interval_steps = [s for s, _ in tb["noise/b_simple_low"]]  # the bootstrap interval needs two steps
    assert interval_steps == [s for s in noise_steps if s >= 2] == [s for s, _ in tb["noise/b_simple_high"]]
    last = {tag: tb[tag][-1][1] for tag in ("noise/b_simple", "noise/b_simple_low", "noise/b_simple_high")}
    assert last["noise/b_simple_low"] <= last["noise/b_simple"] <= last["noise/b_simple_high"]
    assert last["noise/b_simple"] == pytest.approx(summary["noise_scale"]["b_simple"], rel=1e-5)  # the summary's value

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert [int(r["step"]) for r in rows if r["b_simple"]] == noise_steps
    assert [int(r["step"]) for r in rows if r["val_acc"]] == [6, 12]
    steps = [json.loads(ln) for ln in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 13)) and steps[-1]["b_simple"] == pytest.approx(last["noise/b_simple"], rel=1e-5)


def test_logging_does_not_change_the_run(tmp_path, capsys):
    capsys.readouterr()
    assert main([*SMALL, "--noise-scale"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*SMALL, "--noise-scale", "--log", "csv", "--log-dir", str(tmp_path / "logs")]) == 0
    logged = json.loads(capsys.readouterr().out)
    for key in ("final_train_loss", "val_loss", "val_metric"):
        assert logged[key] == plain[key]
    assert logged["noise_scale"]["b_simple"] == plain["noise_scale"]["b_simple"]  # reading it every step changes nothing


@pytest.mark.parametrize("flags, message", [
    (["--log", "tensorboard"], "--log needs a directory"),
    (["--log", "wandb", "--out", "x"], "--log must be one of tensorboard, csv, jsonl"),
    (["--log-dir", "x"], "--log-dir needs --log"),
])
def test_bad_log_flags_are_one_line(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main([*SMALL, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_without_tensorboard_installed_it_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    capsys.readouterr()
    assert main([*SMALL, "--log", "tensorboard", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "needs the tensorboard package: pip install 'batchpilot[tensorboard]'" in err
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_a_resumed_run_drops_what_the_earlier_attempt_logged_after_its_checkpoint(tmp_path, capsys):
    """As after kill -9: the earlier attempt logged steps 9-10 past its checkpoint (step 8); the resumed run
    logs 9-12 once, and its curves do not fold back."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    args = ["train", "--workload", "mnist1d-mlp", "--workload-opt", "num_train=600", "--workload-opt", "num_val=200",
            "--batch", "64", "--seed", "0", "--json", "--log", "csv", "--log", "tensorboard", "--out", str(out)]
    assert main([*args, "--steps", "8"]) == 0
    with open(out / "metrics.csv", "a") as fh:  # the lost attempt's rows past the checkpoint
        fh.write("9,999,,,,,,,,,,,,\n10,999,,,,,,,,,,,,\n")
    lost = SummaryWriter(str(out / "tensorboard"))
    for step in (9, 10):
        lost.add_scalar("train/loss", 999.0, global_step=step)
    lost.close()
    assert main([*args, "--steps", "12", "--resume"]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 13)) and all(float(r["loss"]) < 999 for r in rows)
    loss = _scalars(out / "tensorboard")["train/loss"]
    assert [s for s, _ in loss] == list(range(1, 13)) and all(v < 999 for _, v in loss)
