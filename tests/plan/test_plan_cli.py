"""``batchpilot plan`` and ``train --plan`` end to end; make_plan, the probe and the report on small workloads."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from batchpilot.cli import main
from batchpilot.plan import make_plan, probe_noise, write_plan
from batchpilot.report.plan_report import write_plan_report
from plan_fakes import fake_curve, fake_probe
from batchpilot.workloads import get_workload

KEYS = ("micro_batch_per_rank", "accumulation_steps", "world_size", "global_batch", "lr", "lr_rule", "warmup_steps",
        "noise_scale", "samples_per_s", "efficiency", "goodput", "peak_bytes", "max_micro_batch", "caveats")


def test_make_plan_with_given_measurements_and_its_report(tmp_path):
    w = get_workload("mnist1d-mlp", num_train=400, num_val=100)
    rng = torch.get_rng_state()
    plan = make_plan(w, probe=fake_probe(), throughput=fake_curve(), threads=1)
    assert torch.equal(torch.get_rng_state(), rng)
    d = plan.to_dict()
    assert all(k in d for k in KEYS)
    assert d["global_batch"] == d["micro_batch_per_rank"] * d["accumulation_steps"] * d["world_size"]
    assert d["noise_scale"] == 82.0 and d["lr_rule"] == "linear"  # SGD workload
    assert d["goodput"] >= (1 - 0.1) * max(c["goodput"] for c in d["candidates"])  # a tie spans at most 10%
    assert d["global_batch"] in d["tied_batches"]
    assert d["noise"]["method"] == "probe_effective" and d["noise"]["b_used"] == 82.0  # no loss phases: no trend
    assert d["predicted_steps_to_target"] is not None and d["warmup_steps"] >= 0
    assert "largest_that_fits" in d["alternatives"] and "base_batch" in d["alternatives"]
    assert str(d["global_batch"]) in d["why"]
    path = write_plan_report(d, tmp_path / "report.html")
    html = path.read_text()
    assert len(re.findall(r"src='data:image/png;base64,", html)) == 4  # M(B), throughput+MFU, noise, goodput
    assert "<script" not in html and "src='http" not in html
    for title in ("Memory M(B)", "Throughput and MFU", "Gradient noise scale", "Goodput and the alternatives"):
        assert title in html


def test_probe_measures_noise_at_several_points_and_restores_rng():
    w = get_workload("mnist1d-cnn", num_train=640, num_val=100)
    rng = torch.get_rng_state()
    probe = probe_noise(w, time_budget_s=4.0, max_epochs=6, evals_per_epoch=4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(probe.points) >= 2
    assert probe.micro_batch == 16 and probe.batch == 32 and probe.units_per_sample == 1.0
    assert [p.step for p in probe.points] == sorted(p.step for p in probe.points)
    assert probe.b_noise_effective > 0 and math.isfinite(probe.b_noise_effective)
    assert probe.b_noise_low <= probe.b_noise_effective <= probe.b_noise_high


def test_plan_cli_rejects_bad_input(tmp_path, capsys):
    assert main(["plan", "--noise-budget", "0"]) == 2
    assert "noise-budget" in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["plan", "--out", str(f)]) == 2
    assert main(["plan", "--workload", "no-such-workload", "--out", str(tmp_path)]) == 2
    assert main(["train", "--plan", str(tmp_path / "missing.json")]) == 2


def test_train_runs_a_plan(tmp_path, capsys):
    w = get_workload("mnist1d-mlp", num_train=400, num_val=100)
    plan = make_plan(w, probe=fake_probe(), throughput=fake_curve(), threads=1)
    data = plan.to_dict()
    write_plan(plan, tmp_path / "plan.json")
    rc = main(["train", "--plan", str(tmp_path / "plan.json"), "--workload-opt", "num_train=400",
               "--workload-opt", "num_val=100", "--steps", "2", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["workload"] == "mnist1d-mlp"
    for key in ("global_batch", "micro_batch_per_rank", "accumulation_steps", "warmup_steps"):
        assert out[key] == data[key]
    assert out["lr"] == pytest.approx(data["lr"])
    # an explicit flag wins over the plan
    rc = main(["train", "--plan", str(tmp_path / "plan.json"), "--workload-opt", "num_train=400",
               "--workload-opt", "num_val=100", "--steps", "1", "--batch", "16", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["global_batch"] == 16


def test_train_plan_uses_the_plans_threads_and_reports_predicted_vs_measured(tmp_path, capsys):
    import dataclasses

    w = get_workload("mnist1d-mlp", num_train=400, num_val=100)
    plan = dataclasses.replace(make_plan(w, probe=fake_probe(), throughput=fake_curve(), threads=1), threads=1)
    write_plan(plan, tmp_path / "plan.json")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rc = main(["train", "--plan", str(tmp_path / "plan.json"), "--workload-opt", "num_train=400",
                   "--workload-opt", "num_val=100", "--epochs", "3", "--eval-every", "5", "--stop-at-target",
                   "--json"])
        assert rc == 0
        out = json.loads(capsys.readouterr().out)
        assert out["threads"] == 1  # the plan's, not the 2 set before
        check = out["plan_check"]
        assert check["same_batch_as_plan"] and check["threads_planned"] == 1
        assert check["predicted_steps_to_target"] == plan.predicted_steps_to_target
        if out["steps_to_target"] is not None:
            assert check["steps_ratio"] == pytest.approx(out["steps_to_target"] / plan.predicted_steps_to_target)
        # --threads wins over the plan
        rc = main(["train", "--plan", str(tmp_path / "plan.json"), "--workload-opt", "num_train=400",
                   "--workload-opt", "num_val=100", "--steps", "1", "--threads", "2", "--json"])
        assert rc == 0 and json.loads(capsys.readouterr().out)["threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_make_plan_runs_the_lr_check_and_the_trend_on_a_real_probe():
    w = get_workload("mnist1d-mlp", num_train=600, num_val=150)
    plan = make_plan(w, throughput=fake_curve(), threads=1, noise_budget_s=4.0, lr_check_budget_s=3.0,
                     confirm_budget_s=6.0).to_dict()
    check = plan["lr_check"]
    assert check["multipliers"][0] < 1.0 < check["multipliers"][-1] and len(check["late_losses"]) >= 2
    assert plan["base_lr"] == pytest.approx(w.base_lr * check["chosen_multiplier"])
    noise = plan["noise"]
    assert noise["method"].split("+")[0] in ("trend_vs_loss", "probe_effective")
    assert plan["noise_scale"] == noise["b_used"] > 0
    conf = noise["confirmation"]  # --confirm is on by default: the base batch plus larger ones
    assert conf["batches"][0] == w.base_batch and len(conf["batches"]) >= 2
    if noise["method"].endswith("+confirmed") and conf["b_crit"] is not None:
        assert noise["b_used"] == pytest.approx(conf["b_crit"])
    assert plan["probe_cost_s"] > 0 and len(plan["goodput_band"]) == 2
    if plan["noise_probe"]["status"] != "target_reached":
        assert any("extrapolated" in c or "does not yet point" in c for c in plan["caveats"])


@pytest.mark.slow
def test_plan_cli_writes_the_three_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["plan", "--workload-opt", "num_train=1000", "--noise-budget", "20", "--json", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "plan.json").read_text())
    assert printed["global_batch"] == saved["global_batch"]
    assert all(k in saved for k in KEYS)
    assert saved["global_batch"] == saved["micro_batch_per_rank"] * saved["accumulation_steps"] * saved["world_size"]
    assert (out / "report.html").stat().st_size > 10_000
