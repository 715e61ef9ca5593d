"""Sweep analysis: the McCandlish fit, Shallue regimes, the gap rule, best LR per batch, the plan ratio."""

from __future__ import annotations


import pytest

from batchpilot.sweep.analysis import analyze, classify_regimes, fit_scaling, summarize_batch


def trial(batch, steps, *, mult=1.0, seed=0, val=0.9, train=0.95, tag="grid", time_s=None, diverged=False, eig=1.0):
    return {"batch": batch, "lr_multiplier": mult, "seed": seed, "lr": 0.1 * mult, "tag": tag, "steps_to_target": steps,
            "examples_to_target": None if steps is None else steps * batch,
            "time_to_target_s": None if steps is None else (time_s if time_s is not None else steps * 0.01),
            "median_time_to_target_s": None if steps is None else steps * 0.01,
            "val_metric": None if diverged else val, "train_metric": None if diverged else train,
            "generalization_gap": None if diverged else train - val, "diverged": diverged,
            "status": "diverged" if diverged else "completed", "metric_name": "val_acc", "higher_is_better": True,
            "target": "val_acc>=0.8", "samples_per_s": 1000.0, "sharpness": {"top_eigenvalue": eig, "trace": 10 * eig},
            "steps": 100, "warmup_steps": 0}


def test_fit_recovers_mccandlish_parameters():
    s_min, b_crit = 120.0, 256.0
    batches = [16, 32, 64, 128, 256, 512, 1024, 2048]
    steps = [s_min * (1 + b_crit / b) for b in batches]
    fit, note = fit_scaling(batches, steps)
    assert note == ""
    assert fit.s_min == pytest.approx(s_min, rel=1e-9) and fit.b_crit == pytest.approx(b_crit, rel=1e-9)
    assert fit.e_min == pytest.approx(s_min * b_crit, rel=1e-9) and fit.rel_rmse < 1e-9
    # McCandlish et al. 2018: (S/S_min - 1)(E/E_min - 1) = 1
    for b in (20.0, 300.0, 5000.0):
        assert (fit.steps(b) / fit.s_min - 1) * (fit.examples(b) / fit.e_min - 1) == pytest.approx(1.0)
    noisy = [s * (1.05 if i % 2 else 0.95) for i, s in enumerate(steps)]
    fit2, _ = fit_scaling(batches, noisy)
    assert 0.7 * b_crit < fit2.b_crit < 1.4 * b_crit


def test_fit_refuses_degenerate_data():
    assert fit_scaling([32, 64], [100, 50])[0] is None
    fit, note = fit_scaling([32, 64, 128], [100, 100, 110])
    assert fit is None and "no gain" in note
    fit, note = fit_scaling([32, 64, 128], [400, 200, 100])
    assert fit is None or fit.b_crit > 1000  # perfect scaling: B_crit beyond the range
    fit, note = fit_scaling([32, 64, 128], [400, 190, 80])
    assert fit is None and "perfect scaling" in note


def test_regimes():
    regs = classify_regimes([32, 64, 128, 256, 512], [800, 400, 240, 230, None])
    assert [r.regime for r in regs] == ["perfect", "diminishing", "no_gain"]
    assert regs[0].slope == pytest.approx(1.0)
    assert (regs[2].batch_low, regs[2].batch_high) == (128, 256)


def test_best_lr_multiplier_per_batch_is_fewest_steps_then_val():
    ts = [trial(64, 300, mult=0.5, seed=0), trial(64, 320, mult=0.5, seed=1),
          trial(64, 200, mult=1.0, seed=0), trial(64, None, mult=1.0, seed=1),  # one seed missed: not reliable
          trial(64, 250, mult=2.0, seed=0, val=0.7), trial(64, 250, mult=2.0, seed=1, val=0.72)]
    r = summarize_batch(ts)
    assert r.lr_multiplier == 2.0 and r.steps_to_target == 250 and r.reached == 2 and r.seeds == 2
    assert r.val_metric == pytest.approx(0.71) and r.best_val_metric == pytest.approx(0.9)
    none = summarize_batch([trial(64, None, mult=1.0, val=0.5), trial(64, None, mult=2.0, val=0.6)])
    assert none.lr_multiplier == 2.0 and none.steps_to_target is None


def test_gap_rule_flags_more_than_two_points_and_offers_hypotheses():
    ts = [trial(32, 1000, val=0.90, train=0.93), trial(64, 520, val=0.885, train=0.92),
          trial(128, 300, val=0.87, train=0.99), trial(256, 250, val=0.80, train=0.85)]
    a = analyze(ts)
    flagged = {f.batch: f for f in a.gap_flags}
    assert set(flagged) == {128, 256}  # 64 is 1.5 points below: not flagged
    assert flagged[128].drop == pytest.approx(0.03)
    assert flagged[128].overfitting and any("weight decay" in h for h in flagged[128].hypotheses)
    assert not flagged[256].overfitting and any("under-fitting" in h for h in flagged[256].hypotheses)
    assert all("--lr-multipliers" in f.hypotheses[0] for f in flagged.values())  # LR untuned: say so first
    assert a.best_val_batch == 32 and a.best_batch_by_steps == 256


def test_analysis_fit_regimes_plan_and_diverged():
    s_min, b_crit = 100.0, 128.0
    ts = [trial(b, s_min * (1 + b_crit / b), time_s=(s_min * (1 + b_crit / b)) * (0.01 + b / 20000)) for b in (16, 32, 64, 128, 256, 512)]
    ts.append(trial(1024, None, diverged=True))
    ts.append(trial(96, 240, tag="plan", time_s=3.0))
    a = analyze(ts, plan={"global_batch": 96, "noise_scale": {"b_simple": 150.0}})
    assert a.fit.b_crit == pytest.approx(b_crit, rel=1e-6)
    assert [b.batch for b in a.batches] == [16, 32, 64, 128, 256, 512, 1024]  # the plan's trial is not in the grid
    times = {b.batch: b.time_to_target_s for b in a.batches if b.time_to_target_s}
    best = min(times, key=times.get)
    assert a.best_batch_by_time == best
    assert a.plan.time_ratio == pytest.approx(3.0 / times[best])
    assert a.plan.noise_scale == 150.0 and any("B_crit" in n for n in a.notes)
    assert any("diverged" in n for n in a.notes)
    assert a.regimes[0].regime == "diminishing" or a.regimes[0].regime == "perfect"
    missing = analyze(ts[:-1], plan={"global_batch": 96})
    assert missing.plan.time_ratio is None and "not run" in missing.plan.note


def test_report_renders(tmp_path):
    from batchpilot.report.sweep_report import write_sweep_report

    ts = [trial(b, 100 * (1 + 128 / b), eig=b / 10) for b in (16, 64, 256)] + [trial(64, 150, tag="plan")]
    a = analyze(ts, plan={"global_batch": 64})
    path = write_sweep_report(tmp_path / "report.html", a, ts, workload="w")
    html = path.read_text()
    assert html.count("<img") == 4 and "time_to_target(plan)/best" in html and "Scaling regimes" in html


def test_time_basis_median_step_ignores_a_spike():
    ts = [trial(32, 400, time_s=4.0), trial(64, 220, time_s=9.0), trial(128, 150, time_s=1.6)]  # 64 hit a busy spell
    ts.append(trial(64, 220, tag="plan", time_s=2.3))
    measured = analyze(ts, plan={"global_batch": 64})
    assert measured.best_batch_by_time == 128 and measured.plan.time_ratio == pytest.approx(2.3 / 1.6)
    robust = analyze(ts, plan={"global_batch": 64}, time_basis="median_step")
    assert robust.time_basis == "median_step" and robust.best_batch_by_time == 128
    assert robust.plan.time_ratio == pytest.approx(2.2 / 1.5) and robust.plan.time_basis == "median_step"
    with pytest.raises(ValueError):
        analyze(ts, time_basis="fastest")
