"""bench/plan_accuracy.py: the B_crit fit and the grid (fast), and a --quick run end to end (slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def pa():
    sys.path.insert(0, str(BENCH))
    try:
        import plan_accuracy

        yield plan_accuracy
    finally:
        sys.path.remove(str(BENCH))


def test_fit_recovers_b_crit_from_exact_steps(pa):
    batches = [8, 16, 32, 64, 128, 256, 512]
    steps = [1000 * (1 + 100 / b) for b in batches]
    fit = pa.fit_b_crit(batches, steps)
    assert fit["b_crit"] == pytest.approx(100, rel=1e-3)
    assert fit["s_min"] == pytest.approx(1000, rel=1e-3)
    assert fit["rms_log_residual"] < 1e-4 and "note" not in fit


def test_fit_skips_unreached_batches_and_says_when_points_are_few(pa):
    fit = pa.fit_b_crit([8, 16, 32], [math.inf, 300.0, 200.0])
    assert fit["n_points"] == 2 and "fewer than 3" in fit["note"]
    assert "no fit" in pa.fit_b_crit([8, 16], [math.inf, math.inf])["note"]


def test_fit_flags_perfect_scaling_at_the_bound(pa):
    batches = [8, 16, 32, 64]
    fit = pa.fit_b_crit(batches, [6400 / b for b in batches])  # S ~ 1/B: B_crit beyond any batch
    assert "upper bound" in fit["note"]


def test_grid_is_base_over_4_to_16_base_capped_by_a_quarter_of_the_data(pa):
    assert pa.grid_batches(32, 4000) == [8, 16, 32, 64, 128, 256, 512]
    assert pa.grid_batches(64, 40_000) == [16, 32, 64, 128, 256, 512, 1024]
    assert pa.grid_batches(32, 1000) == [8, 16, 32, 64, 128]  # N/4 = 250


TINY = '''
import torch
from torch.utils.data import TensorDataset
from batchpilot import Workload
from batchpilot.workloads.spec import Target

def make_workload():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return Workload(
        name="tiny", make_model=lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)),
        train_data=TensorDataset(x[:1000], y[:1000]), val_data=TensorDataset(x[1000:], y[1000:]),
        loss_sum=lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="sum"),
        metric_sum=lambda out, t: (out.argmax(-1) == t).sum(),
        make_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
        base_batch=16, base_lr=0.05, target=Target("val_acc", ">=", 0.85),
    )
'''


@pytest.mark.slow
def test_quick_run_writes_a_graded_result_and_a_rerun_skips_done_work(tmp_path):
    wl = tmp_path / "tiny.py"
    wl.write_text(TINY)
    out = tmp_path / "acc.json"
    cmd = [sys.executable, str(BENCH / "plan_accuracy.py"), "--quick", "--workloads", f"{wl}:make_workload",
           "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rec = json.loads(out.read_text())["workloads"][f"{wl}:make_workload"]
    s = rec["summary"]
    assert [r["batch"] for r in s["per_batch"]] == [16, 32]
    assert s["best"] is not None and s["plan_over_best"] > 0 and s["plan_wall_s"] > 0 and s["cost_share"] > 0
    assert s["b_noise"] is not None and rec["plan"]["args"][-1] == "--no-report"
    assert all(t["reached"] for t in rec["trials"].values())
    assert "plan/best" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the stored plan" in again.stdout and "seed 0:" not in again.stdout
    assert json.loads(out.read_text())["workloads"][f"{wl}:make_workload"]["trials"] == rec["trials"]
