"""Bad checkpoints, foreign weights and flags that used to be accepted silently: one line, exit 2,
and not a byte changed on disk."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from batchpilot import BatchpilotError
from batchpilot.cli import main
from batchpilot.errors import EXIT_USAGE
from batchpilot.train import TrainConfig, Trainer

BASE = ["train", "--workload", "mnist1d-mlp", "--workload-opt", "num_train=600", "--workload-opt", "num_val=200",
        "--batch", "32", "--steps", "4", "--seed", "0"]


def _tree(path) -> dict[str, str]:
    """Every file under ``path`` with a hash of its bytes (new, removed or changed files all show)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("batchpilot train: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture()
def run_dir(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*BASE, "--checkpoint-every", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _garbage(p):
    p.write_bytes(bytes(range(256)) * 40)


def _empty(p):
    p.write_bytes(b"")


def _not_a_checkpoint(p):
    torch.save({"weights": torch.zeros(3)}, p)


def _a_list(p):
    torch.save([1, 2, 3], p)


@pytest.mark.parametrize("damage, expected", [
    (_truncate, "cannot be read"), (_garbage, "cannot be read"), (_empty, "is empty"),
    (_not_a_checkpoint, "is not a batchpilot checkpoint (it lacks config"), (_a_list, "holds a list"),
])
def test_resume_from_a_bad_checkpoint_is_one_line_and_changes_nothing(run_dir, damage, expected, capsys):
    damage(run_dir / "checkpoint.pt")
    before = _tree(run_dir)
    assert main([*BASE, "--checkpoint-every", "2", "--out", str(run_dir), "--resume"]) == EXIT_USAGE
    line = _error_line(capsys)
    assert expected in line and "checkpoint.pt" in line
    assert _tree(run_dir) == before


def test_checkpoint_with_weights_of_another_shape_is_refused(mlp_workload, tmp_path):
    cfg = TrainConfig(global_batch=32, steps=2, seed=0, checkpoint_every=1)
    Trainer(mlp_workload, cfg, out_dir=tmp_path).run()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "checkpoint.pt")
    before = _tree(tmp_path)
    with pytest.raises(BatchpilotError, match=rf"weights are of another model .*1 shape mismatch \({name}: \[3, 3\]"):
        Trainer(mlp_workload, cfg, out_dir=tmp_path, resume=True).run()
    state["model"]["extra.weight"] = state["model"].pop(name)
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(BatchpilotError, match=rf"1 missing \({name}\); 1 unexpected \(extra.weight\)"):
        Trainer(mlp_workload, cfg, out_dir=tmp_path, resume=True).run()
    state["model"], state["counters"] = mlp_workload.make_model().state_dict(), {"bogus": 1}
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(BatchpilotError, match="does not fit this run"):
        Trainer(mlp_workload, cfg, out_dir=tmp_path, resume=True).run()
    assert {k for k in _tree(tmp_path)} == set(before)


def test_init_from_another_models_weights_is_one_line(run_dir, tmp_path, capsys):
    before = _tree(tmp_path)
    new_out = tmp_path / "cnn"
    code = main(["train", "--workload", "mnist1d-cnn", "--workload-opt", "num_train=600", "--workload-opt",
                 "num_val=200", "--steps", "2", "--init-from", str(run_dir / "checkpoint.pt"), "--out", str(new_out)])
    assert code == EXIT_USAGE
    line = _error_line(capsys)
    assert "--init-from weights" in line and "weights are of another model" in line and "missing" in line
    assert _tree(tmp_path) == before and not new_out.exists()


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path, capsys):
    out = tmp_path / "empty"
    assert main([*BASE, "--out", str(out), "--resume", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["steps"] == 4
    notices = [ln for ln in captured.err.splitlines() if "no checkpoint" in ln]
    assert notices == [f"batchpilot train: no checkpoint in {str(out)!r} to resume from; starting fresh"]
    assert (out / "checkpoint.pt").exists()
    # with a checkpoint there, no such notice
    assert main([*BASE, "--steps", "6", "--out", str(out), "--resume", "--json"]) == 0
    assert "no checkpoint" not in capsys.readouterr().err


def test_checkpoint_every_without_out_is_an_error(mlp_workload, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*BASE, "--checkpoint-every", "2"]) == EXIT_USAGE
    line = _error_line(capsys)
    assert "checkpoint" in line and "--out DIR" in line
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BatchpilotError, match=r"checkpoint every 2 steps needs an output directory \(--out DIR\)"):
        Trainer(mlp_workload, TrainConfig(global_batch=32, steps=4, checkpoint_every=2))


def test_unknown_target_metric_lists_the_reported_ones(mlp_workload, capsys):
    assert main([*BASE, "--target", "nonexistent>=1"]) == EXIT_USAGE
    line = _error_line(capsys)
    assert "'nonexistent'" in line and "expected one of: val_acc, val_loss, loss" in line
    with pytest.raises(BatchpilotError, match="does not report"):
        Trainer(mlp_workload, TrainConfig(global_batch=32, steps=1, target="val_accuracy>=0.5"))
    Trainer(mlp_workload, TrainConfig(global_batch=32, steps=1, target="val_loss<=0.5"))  # a reported one is fine


def test_resuming_a_finished_run_leaves_its_checkpoint_alone(tmp_path):
    from batchpilot.cli import main

    out = tmp_path / "run"
    args = ["train", "--workload", "mnist1d-mlp", "--workload-opt", "num_train=256", "--workload-opt", "num_val=64",
            "--batch", "32", "--steps", "3", "--out", str(out), "--json"]
    assert main(args) == 0
    ckpt = out / "checkpoint.pt"
    before = (ckpt.read_bytes(), ckpt.stat().st_mtime_ns)
    assert main(args + ["--resume"]) == 0
    assert (ckpt.read_bytes(), ckpt.stat().st_mtime_ns) == before
