"""The sweep's HTML report: steps, examples, validation metric and sharpness against batch.

Rendering only: every number comes from :class:`batchpilot.sweep.analysis.SweepAnalysis`
and the trial results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from batchpilot.report.html import Section, write_html
from batchpilot.sweep.analysis import SweepAnalysis


def _fig():
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.0))


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, **kw)
    else:
        ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes)


def _mark_plan(ax, analysis: SweepAnalysis) -> None:
    if analysis.plan is not None:
        ax.axvline(analysis.plan.global_batch, color="tab:red", ls=":", lw=1.5, label=f"plan: B={analysis.plan.global_batch}")


def _steps_figure(a: SweepAnalysis):
    import numpy as np

    fig, ax = _fig()
    pts = [(r.batch, r.steps_to_target) for r in a.batches if r.steps_to_target is not None]
    if pts:
        b, s = map(np.array, zip(*pts))
        ax.loglog(b, s, "o-", color="tab:blue", label="measured (best LR per batch)")
        b0, s0 = b[0], s[0]
        grid = np.geomspace(min(r.batch for r in a.batches), max(r.batch for r in a.batches), 100)
        ax.loglog(grid, s0 * b0 / grid, "--", color="gray", label="perfect scaling (S ∝ 1/B)")
        if a.fit is not None:
            ax.loglog(grid, [a.fit.steps(x) for x in grid], "-", color="tab:green",
                      label=f"fit S_min(1+B_crit/B): B_crit={a.fit.b_crit:.0f}")
            ax.axvline(a.fit.b_crit, color="tab:green", ls="-.", lw=0.8)
    if a.plan is not None and a.plan.steps_to_target:
        ax.loglog([a.plan.global_batch], [a.plan.steps_to_target], "r*", ms=14, label="plan's trial")
    _mark_plan(ax, a)
    ax.set_xlabel("global batch B")
    ax.set_ylabel(f"steps to {a.target}")
    ax.set_title("Steps to target (Shallue et al. 2019; McCandlish et al. 2018)")
    _legend(ax)
    return fig


def _examples_figure(a: SweepAnalysis):
    import numpy as np

    fig, ax = _fig()
    pts = [(r.batch, r.examples_to_target) for r in a.batches if r.examples_to_target is not None]
    if pts:
        b, e = map(np.array, zip(*pts))
        ax.loglog(b, e, "o-", color="tab:blue", label="measured")
        if a.fit is not None:
            grid = np.geomspace(b.min(), b.max(), 100)
            ax.loglog(grid, [a.fit.examples(x) for x in grid], "-", color="tab:green", label="fit E_min(1+B/B_crit)")
    _mark_plan(ax, a)
    ax.set_xlabel("global batch B")
    ax.set_ylabel("examples to target")
    ax.set_title("Examples to target")
    _legend(ax)
    return fig


def _val_figure(a: SweepAnalysis):
    fig, ax = _fig()
    rows = [r for r in a.batches if r.best_val_metric is not None]
    if rows:
        ax.semilogx([r.batch for r in rows], [r.best_val_metric for r in rows], "o-", label=f"{a.metric_name} (best LR)")
        tr = [(r.batch, r.train_metric) for r in rows if r.train_metric is not None]
        if tr:
            ax.semilogx(*zip(*tr), "s--", color="tab:orange", alpha=0.7, label="train metric (fewest-steps LR)")
        best = next(r for r in rows if r.batch == a.best_val_batch)
        sign = -1 if a.higher_is_better else 1
        ax.axhline(best.best_val_metric + sign * a.gap_threshold, color="tab:red", ls="--", lw=0.8,
                   label=f"gap rule: best {'−' if a.higher_is_better else '+'} {a.gap_threshold:g}")
        for f in a.gap_flags:
            ax.plot([f.batch], [f.val_metric], "x", color="tab:red", ms=12)
    _mark_plan(ax, a)
    ax.set_xlabel("global batch B")
    ax.set_ylabel(a.metric_name)
    ax.set_title("Final metric (red x: flagged by the gap rule)")
    _legend(ax)
    return fig


def _sharpness_figure(a: SweepAnalysis, mode: str):
    fig, ax = _fig()
    rows = [r for r in a.batches if r.top_eigenvalue is not None]
    if rows:
        ax.loglog([r.batch for r in rows], [abs(r.top_eigenvalue) for r in rows], "o-", label="|top Hessian eigenvalue|")
        tr = [(r.batch, r.hessian_trace) for r in rows if r.hessian_trace is not None and r.hessian_trace > 0]
        if tr:
            ax2 = ax.twinx()
            ax2.set_yscale("log")
            ax2.plot(*zip(*tr), "s--", color="tab:purple", alpha=0.7, label="Hessian trace (Hutchinson)")
            ax2.set_ylabel("trace")
            _legend(ax2, loc="lower right")
    _mark_plan(ax, a)
    ax.set_xlabel("global batch B")
    ax.set_ylabel("top eigenvalue")
    ax.set_title(f"Sharpness of the trained weights ({mode} mode)")
    _legend(ax, loc="upper left")
    return fig


def _fmt(v: object, spec: str = ".4g") -> str:
    if v is None:
        return "—"
    return format(v, spec) if isinstance(v, float) else str(v)


def build_sections(analysis: SweepAnalysis, trials: Sequence[dict], *, sharpness_mode: str = "eval") -> list[Section]:
    """The report's sections."""
    a = analysis
    basis = "measured training time" if a.time_basis == "measured" else "steps × median step time"
    summary = [f"Target: {a.target}. Each batch keeps its best LR multiplier (fewest steps to target). Time basis: {basis}.",
               f"Fastest to target by time: batch {a.best_batch_by_time}; by steps: batch {a.best_batch_by_steps}; "
               f"best {a.metric_name}: batch {a.best_val_batch}."]
    if a.fit is not None:
        summary.append(f"McCandlish fit: S_min = {a.fit.s_min:.1f} steps, B_crit = {a.fit.b_crit:.0f}, "
                       f"E_min = {a.fit.e_min:.0f} examples (relative RMSE {a.fit.rel_rmse:.1%}, {a.fit.points} batches).")
    else:
        summary.append(f"No McCandlish fit: {a.fit_note}.")
    plan_lines = []
    if a.plan is not None:
        p = a.plan
        if p.time_ratio is not None:
            plan_lines.append(f"Plan: batch {p.global_batch} reached the target in {p.time_to_target_s:.2f} s; the best fixed batch "
                              f"({p.best_batch}) in {p.best_time_to_target_s:.2f} s: time_to_target(plan)/best = {p.time_ratio:.3f}.")
        else:
            plan_lines.append(f"Plan: batch {p.global_batch}: {p.note}.")
    head = ["batch", "LR mult", "LR", "seeds", "reached", "diverged", "steps→target", "examples→target", "time→target s",
            "steps × median step s",
            a.metric_name, "train metric", "gap", "top eig", "trace", "samples/s"]
    table = [head] + [[r.batch, r.lr_multiplier, r.lr, r.seeds, r.reached, r.diverged, _fmt(r.steps_to_target),
                       _fmt(r.examples_to_target), _fmt(r.time_to_target_s), _fmt(r.median_time_to_target_s),
                       _fmt(r.best_val_metric),
                       _fmt(r.train_metric), _fmt(r.generalization_gap), _fmt(r.top_eigenvalue), _fmt(r.hessian_trace),
                       _fmt(r.samples_per_s, ".0f")] for r in a.batches]
    regimes = [["batches", "slope −dlogS/dlogB", "regime"]] + [[f"{g.batch_low}→{g.batch_high}", g.slope, g.regime.replace("_", " ")]
                                                                 for g in a.regimes]
    gap_par = [f"Flag: a batch whose {a.metric_name} is more than {a.gap_threshold:g} below the best batch's "
               f"({a.best_val_batch}). Remedies below are hypotheses to test with a sweep, not conclusions."]
    for f in a.gap_flags:
        gap_par.append(f"Batch {f.batch}: {a.metric_name} {f.val_metric:.4f} ({f.drop:.4f} below the best; "
                       f"{'over-fitting' if f.overfitting else 'not over-fitting'}). Hypotheses: " + "; ".join(f.hypotheses) + ".")
    if not a.gap_flags:
        gap_par.append("No batch is flagged.")
    trial_head = ["tag", "batch", "LR mult", "seed", "LR", "warmup", "status", "steps", "steps→target", "time→target s", a.metric_name, "gap"]
    trial_rows = [[t.get("tag", "grid"), t["batch"], t["lr_multiplier"], t["seed"], t["lr"], t["warmup_steps"], t["status"], t["steps"],
                   _fmt(t["steps_to_target"]), _fmt(t["time_to_target_s"]), _fmt(t["val_metric"]), _fmt(t["generalization_gap"])]
                  for t in sorted(trials, key=lambda t: (t.get("tag", "grid"), t["batch"], t["lr_multiplier"], t["seed"]))]
    return [
        Section("Summary", paragraphs=summary + plan_lines, caveats=list(a.notes)),
        Section("Per batch (best LR)", table=table),
        Section("Steps to target", paragraphs=["Log-log. Gray: perfect scaling from the smallest batch; green: the fitted "
                                               "S = S_min(1 + B_crit/B)."], figures=[_steps_figure(a)]),
        Section("Scaling regimes (Shallue et al. 2019)", table=regimes if a.regimes else None,
                paragraphs=[f"Perfect: slope ≥ 0.8; no gain: slope ≤ 0.1; diminishing in between."]),
        Section("Examples to target", figures=[_examples_figure(a)]),
        Section("Generalization: the gap rule", paragraphs=gap_par, figures=[_val_figure(a)]),
        Section("Sharpness", paragraphs=[f"Top eigenvalue by power iteration and trace by Hutchinson's estimator, on the mean "
                                         f"training loss of a fixed training sample, model in {sharpness_mode} mode."],
                figures=[_sharpness_figure(a, sharpness_mode)]),
        Section("All trials", table=[trial_head] + trial_rows),
    ]


def write_sweep_report(path: str | Path, analysis: SweepAnalysis, trials: Sequence[dict], *, workload: str,
                       sharpness_mode: str = "eval") -> Path:
    """Write the sweep's self-contained ``report.html``."""
    return write_html(path, f"batchpilot sweep: {workload}", build_sections(analysis, trials, sharpness_mode=sharpness_mode),
                      subtitle=f"{len(trials)} trials")
