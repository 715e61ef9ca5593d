"""A plan records how to rebuild its workload: ``plan --workload my.py:fn`` then ``train --plan`` / ``sweep --plan``
with the same ``--workload`` (or ``--trust-plan-workload``); the plan alone never runs user code."""

from __future__ import annotations

import json
import shlex

import pytest

from batchpilot.cli import main

USER_WORKLOAD = '''
import pathlib
import torch
from torch.utils.data import TensorDataset
from batchpilot import Workload

pathlib.Path("imported.marker").write_text("my_wl.py ran")

def make_workload(n=256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long()
    cut = n * 3 // 4
    return Workload(name="tiny-gpt2", make_model=lambda: torch.nn.Linear(8, 2),
                    train_data=TensorDataset(x[:cut], y[:cut]), val_data=TensorDataset(x[cut:], y[cut:]),
                    loss_sum=lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="sum"),
                    metric_sum=lambda o, t: (o.argmax(-1) == t).sum(),
                    make_optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr), base_batch=16, base_lr=0.05)
'''


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "my_wl.py").write_text(USER_WORKLOAD)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def fast_plan(monkeypatch):
    """``batchpilot plan`` with given measurements instead of the timed probes."""
    import batchpilot.plan as plan_pkg
    from plan_fakes import fake_curve, fake_probe

    real = plan_pkg.make_plan
    monkeypatch.setattr(plan_pkg, "make_plan", lambda w, **kw: real(w, probe=fake_probe(), throughput=fake_curve(),
                                                                      threads=1))


def test_plan_then_train_and_sweep_a_user_workload(user_dir, fast_plan, capsys):
    assert main(["plan", "--workload", "my_wl.py:make_workload", "--workload-opt", "n=320", "--out", "P",
                 "--no-report", "--json"]) == 0
    out = capsys.readouterr().err  # under --json the command goes to stderr, stdout holds the plan
    plan = json.loads((user_dir / "P" / "plan.json").read_text())
    assert plan["workload"] == "tiny-gpt2" and plan["schema_version"] == 1
    assert plan["workload_spec"] == {"name": "my_wl.py:make_workload", "options": {"n": 320}, "kind": "path",
                                     "file": str(user_dir / "my_wl.py")}
    command = next(line for line in out.splitlines() if line.startswith("run it with: ")).removeprefix("run it with: ")
    assert command == "batchpilot train --plan P/plan.json --workload my_wl.py:make_workload"
    # the printed command runs the plan (with the plan's own options)
    assert main([*shlex.split(command)[1:], "--steps", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["workload"] == "tiny-gpt2" and summary["global_batch"] == plan["global_batch"]
    assert main(["sweep", "--plan", "P/plan.json", "--workload", "my_wl.py:make_workload", "--batches", "16",
                 "--max-epochs", "1", "--no-sharpness", "--store", "s.db", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {t["tag"] for t in data["trials"]} == {"grid", "plan"}


def test_a_plan_alone_runs_no_user_code(user_dir, fast_plan, capsys):
    assert main(["plan", "--workload", "my_wl.py:make_workload", "--out", "P", "--no-report", "--json"]) == 0
    assert "run it with: batchpilot train --plan P/plan.json --workload my_wl.py:make_workload" in capsys.readouterr().err
    (user_dir / "imported.marker").unlink()
    for argv in (["train", "--plan", "P/plan.json", "--steps", "1"],
                 ["sweep", "--plan", "P/plan.json", "--batches", "16", "--store", "s.db"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "runs your code 'my_wl.py:make_workload'" in err and "--trust-plan-workload" in err
        assert not (user_dir / "imported.marker").exists() and not (user_dir / "s.db").exists()
    assert main(["train", "--plan", "P/plan.json", "--steps", "1", "--trust-plan-workload", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["workload"] == "tiny-gpt2"
    assert (user_dir / "imported.marker").exists()


def test_a_plan_of_a_builtin_rebuilds_it_with_its_options(user_dir, fast_plan, capsys):
    assert main(["plan", "--workload", "mnist1d-mlp", "--workload-opt", "num_train=400", "--workload-opt",
                 "num_val=100", "--out", "P", "--no-report", "--json"]) == 0
    assert "run it with: batchpilot train --plan P/plan.json\n" in capsys.readouterr().err
    assert main(["train", "--plan", "P/plan.json", "--steps", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["workload"] == "mnist1d-mlp"


@pytest.mark.slow
def test_real_plan_of_a_user_workload_then_train(user_dir, capsys):
    assert main(["plan", "--workload", "my_wl.py:make_workload", "--out", "P", "--no-report", "--probe-budget", "3",
                 "--throughput-budget", "3", "--lr-check-budget", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    command = next(line for line in out.splitlines() if line.startswith("run it with: ")).removeprefix("run it with: ")
    assert main([*shlex.split(command)[1:], "--steps", "5"]) == 0
