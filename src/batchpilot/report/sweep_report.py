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

    return plt.subplots(figsize=(6.4, 4.6), layout="constrained")


def _batch_ticks(ax, batches) -> None:
    """Ticks at the swept batches, labelled as plain integers (no crowded ``3×10^1``), thinned when many."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    bs = sorted({int(b) for b in batches})
    if not bs:
        return
    step = max(1, -(-len(bs) // 8))  # at most 8 labels
    shown = bs[::step] if bs[-1] in bs[::step] else bs[::step] + [bs[-1]]
    ax.xaxis.set_major_locator(FixedLocator(shown))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    if len(shown) * max(len(f"{b:g}") for b in shown) > 36:  # long labels: slant them so they cannot touch
        for label in ax.get_xticklabels():
            label.set_rotation(45)
            label.set_horizontalalignment("right")


def _plain_log_y(ax) -> None:
    """Log-scale y labels as plain numbers at 1, 2, 5 × 10^k."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(ax.get_ylim())
    span = hi / lo if lo > 0 else 1e9
    subs = (tuple(range(1, 10)) if span < 4 else (1.0, 2.0, 3.0, 5.0) if span < 30 else (1.0, 2.0, 5.0) if span < 1e4 else (1.0,))
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _legend(ax, *twins) -> None:
    """One legend for the axes (and any twin axes), below the plot so it never hides a point."""
    handles, labels = ax.get_legend_handles_labels()
    for t in twins:
        h, lab = t.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    if handles:
        ax.figure.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes)


def _batches(a: SweepAnalysis) -> list[int]:
    return [r.batch for r in a.batches] + ([a.plan.global_batch] if a.plan is not None else [])


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
            ax.axvline(a.fit.b_crit, color="tab:green", ls="-.", lw=0.8, label=f"B_crit = {a.fit.b_crit:.0f} (fitted)")
    if a.plan is not None and a.plan.steps_to_target:
        ax.loglog([a.plan.global_batch], [a.plan.steps_to_target], "r*", ms=14, label="plan's trial")
    _mark_plan(ax, a)
    _batch_ticks(ax, _batches(a))
    _plain_log_y(ax)
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
    _batch_ticks(ax, _batches(a))
    _plain_log_y(ax)
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
    _batch_ticks(ax, _batches(a))
    ax.set_xlabel("global batch B")
    ax.set_ylabel(a.metric_name)
    ax.set_title("Final metric (red x: flagged by the gap rule)")
    _legend(ax)
    return fig


def _sharpness_figure(a: SweepAnalysis, mode: str):
    fig, ax = _fig()
    rows = [r for r in a.batches if r.top_eigenvalue is not None]
    twins = []
    if rows:
        ax.loglog([r.batch for r in rows], [abs(r.top_eigenvalue) for r in rows], "o-", label="|top Hessian eigenvalue|")
        tr = [(r.batch, r.hessian_trace) for r in rows if r.hessian_trace is not None and r.hessian_trace > 0]
        if tr:
            ax2 = ax.twinx()
            ax2.set_yscale("log")
            ax2.plot(*zip(*tr), "s--", color="tab:purple", alpha=0.7, label="Hessian trace (Hutchinson)")
            ax2.set_ylabel("trace")
            _plain_log_y(ax2)
            twins.append(ax2)
    _mark_plan(ax, a)
    _batch_ticks(ax, _batches(a))
    _plain_log_y(ax)
    ax.set_xlabel("global batch B")
    ax.set_ylabel("top eigenvalue")
    ax.set_title(f"Sharpness of the trained weights ({mode} mode)")
    _legend(ax, *twins)
    return fig


def _fmt(v: object, spec: str = ".4g") -> str:
    if v is None:
        return "—"
    return format(v, spec) if isinstance(v, float) else str(v)


TIME_KEYS = {"measured": "time_to_target_s", "median_step": "median_time_to_target_s"}


def timing_noise(a: SweepAnalysis, trials: Sequence[dict]) -> float | None:
    """Relative timing noise of the two times in ``time_to_target(plan)/best``, or ``None`` when unknown.

    Two measures of how much one configuration's time moves by itself, per side of the ratio (the plan's
    trials; the best batch's trials at its chosen LR multiplier), summed over the two sides:

    - the spread between seeds of the same configuration, ``(max - min) / min``;
    - for measured times, how far each trial's training wall time is from its steps × median step time
      (start-up, evaluation pauses and a busy machine all show up there).
    """
    p = a.plan
    if p is None or p.time_ratio is None or p.best_batch is None:
        return None
    key = TIME_KEYS.get(a.time_basis, "time_to_target_s")
    best_row = next((r for r in a.batches if r.batch == p.best_batch), None)
    sides = [[t for t in trials if t.get("tag") == "plan"],
             [t for t in trials if t.get("tag", "grid") == "grid" and t["batch"] == p.best_batch
              and (best_row is None or t["lr_multiplier"] == best_row.lr_multiplier)]]
    total, known = 0.0, False
    for side in sides:
        devs = []
        times = [t[key] for t in side if t.get(key)]
        if len(times) > 1:
            devs.append((max(times) - min(times)) / min(times))
        if key == "time_to_target_s":
            devs += [abs(t["time_to_target_s"] / t["median_time_to_target_s"] - 1) for t in side
                     if t.get("time_to_target_s") and t.get("median_time_to_target_s")]
        if devs:
            known = True
            total += max(devs)
    return total if known else None


def plan_lines(a: SweepAnalysis, trials: Sequence[dict]) -> list[str]:
    """The headline comparison of the plan's trial with the best fixed batch, with its timing noise."""
    p = a.plan
    if p is None:
        return []
    if p.time_ratio is None:
        return [f"Plan: batch {p.global_batch}: {p.note}."]
    line = (f"Plan: batch {p.global_batch} reached the target in {p.time_to_target_s:.2f} s; the best fixed batch "
            f"({p.best_batch}) in {p.best_time_to_target_s:.2f} s: time_to_target(plan)/best = {p.time_ratio:.3f}.")
    noise = timing_noise(a, trials)
    within = noise is not None and abs(p.time_ratio - 1) <= noise
    noise_text = f"±{noise:.0%}" if noise is not None else "unknown"
    if p.best_batch == p.global_batch:
        plan_t = next((t for t in trials if t.get("tag") == "plan"), None)
        split = ""
        if plan_t is not None and plan_t.get("micro_batch"):
            split = (f" (plan: micro-batch {plan_t['micro_batch']} × {p.global_batch // plan_t['micro_batch']} accumulation, "
                     f"warmup {plan_t.get('warmup_steps')}, {p.steps_to_target} steps to target)")
        line += (f" The plan's batch is the best fixed batch itself: the ratio compares two runs of the same batch size{split}, "
                 f"so 1 is the expected value and its distance from 1 is "
                 + ("within the timing noise of these runs "
                    f"({noise_text}), not a difference between configurations." if within or noise is None else
                    f"more than the timing noise of these runs ({noise_text}): the two runs differ in split, warmup or "
                    "steps to target, not in batch size."))
    elif within:
        line += (f" That is within the timing noise of these runs ({noise_text}): the plan and the best batch cannot be "
                 "told apart by time here.")
    elif noise is not None:
        line += f" Timing noise of these runs: {noise_text}."
    if p.best_batch != p.global_batch:
        key = TIME_KEYS.get(a.time_basis, "time_to_target_s")
        same = next((r for r in a.batches if r.batch == p.global_batch and getattr(r, key) is not None), None)
        if same is not None:
            line += (f" The grid also ran batch {p.global_batch}: {getattr(same, key):.2f} s (the same batch timed twice; "
                     "a difference from the plan's time is timing noise, or the plan's own split, warmup or LR).")
    return [line]


def _nothing_reached(a: SweepAnalysis) -> bool:
    return all(r.steps_to_target is None for r in a.batches) and not (a.plan and a.plan.steps_to_target)


def build_sections(analysis: SweepAnalysis, trials: Sequence[dict], *, sharpness_mode: str = "eval") -> list[Section]:
    """The report's sections."""
    a = analysis
    basis = "measured training time" if a.time_basis == "measured" else "steps × median step time"
    none_reached = _nothing_reached(a)
    summary = [f"Target: {a.target}. Each batch keeps its best LR multiplier (fewest steps to target). Time basis: {basis}."]
    if none_reached:
        summary.append(f"No batch reached the target {a.target} within the trials' budget, so there is nothing to rank "
                       f"by time or steps and no McCandlish fit. Raise --max-epochs or loosen --target. "
                       + (f"Best {a.metric_name}: batch {a.best_val_batch}." if a.best_val_batch is not None else ""))
    else:
        summary.append(f"Fastest to target by time: batch {a.best_batch_by_time}; by steps: batch {a.best_batch_by_steps}; "
                       + (f"best {a.metric_name}: batch {a.best_val_batch}." if a.best_val_batch is not None
                          else f"no batch has a {a.metric_name}."))
        if a.fit is not None:
            summary.append(f"McCandlish fit: S_min = {a.fit.s_min:.1f} steps, B_crit = {a.fit.b_crit:.0f}, "
                           f"E_min = {a.fit.e_min:.0f} examples (relative RMSE {a.fit.rel_rmse:.1%}, {a.fit.points} batches).")
        else:
            summary.append(f"No McCandlish fit: {a.fit_note}.")
    # two narrower tables (time to target; quality) instead of one of 16 columns that cannot fit the page
    head = ["batch", "LR mult", "LR", "seeds", "reached", "diverged", "steps→target", "examples→target", "time→target s",
            "steps × median step s", "samples/s"]
    table = [head] + [[r.batch, r.lr_multiplier, r.lr, r.seeds, r.reached, r.diverged, _fmt(r.steps_to_target),
                       _fmt(r.examples_to_target), _fmt(r.time_to_target_s), _fmt(r.median_time_to_target_s),
                       _fmt(r.samples_per_s, ".0f")] for r in a.batches]
    quality = [["batch", f"best {a.metric_name}", "train metric", "gap", "top eig", "trace"]] + [
        [r.batch, _fmt(r.best_val_metric), _fmt(r.train_metric), _fmt(r.generalization_gap), _fmt(r.top_eigenvalue),
         _fmt(r.hessian_trace)] for r in a.batches]
    regimes = [["batches", "slope −dlogS/dlogB", "regime"]] + [[f"{g.batch_low}→{g.batch_high}", g.slope, g.regime.replace("_", " ")]
                                                                 for g in a.regimes]
    below = "below" if a.higher_is_better else "above"
    gap_par = [f"Flag: a batch whose {a.metric_name} is more than {a.gap_threshold:g} {below} the best batch's "
               f"({a.best_val_batch}). Remedies below are hypotheses to test with a sweep, not conclusions."]
    for f in a.gap_flags:
        gap_par.append(f"Batch {f.batch}: {a.metric_name} {f.val_metric:.4f} ({f.drop:.4f} {below} the best; "
                       f"{'over-fitting' if f.overfitting else 'not over-fitting'}). Hypotheses: " + "; ".join(f.hypotheses) + ".")
    if not a.gap_flags:
        gap_par.append("No batch is flagged.")
    trial_head = ["tag", "batch", "LR mult", "seed", "LR", "warmup", "status", "steps", "steps→target", "time→target s", a.metric_name, "gap"]
    trial_rows = [[t.get("tag", "grid"), t["batch"], t["lr_multiplier"], t["seed"], t["lr"], t["warmup_steps"], t["status"], t["steps"],
                   _fmt(t["steps_to_target"]), _fmt(t["time_to_target_s"]), _fmt(t["val_metric"]), _fmt(t["generalization_gap"])]
                  for t in sorted(trials, key=lambda t: (t.get("tag", "grid"), t["batch"], t["lr_multiplier"], t["seed"]))]
    if none_reached:
        no_target = (f"Nothing to plot: no batch reached the target {a.target}, so no batch has steps or examples to "
                     "target.")
        steps_section = Section("Steps to target", paragraphs=[no_target])
        examples_section = Section("Examples to target", paragraphs=[no_target])
    else:
        steps_section = Section("Steps to target", paragraphs=[
            "Both axes logarithmic. Gray: perfect scaling from the smallest batch; green: the fitted S = S_min(1 + B_crit/B) "
            "and B_crit (dash-dot); red star: the plan's own trial."], figures=[_steps_figure(a)])
        examples_section = Section("Examples to target", figures=[_examples_figure(a)])
    scored = any(r.best_val_metric is not None for r in a.batches)
    val_section = Section("Generalization: the gap rule", paragraphs=gap_par if scored else
                          [f"No batch has a {a.metric_name} (every trial diverged or none was evaluated)."],
                          figures=[_val_figure(a)] if scored else [])
    sharp_par = (f"Top eigenvalue by power iteration and trace by Hutchinson's estimator, on the mean "
                 f"training loss of a fixed training sample, model in {sharpness_mode} mode.")
    has_sharpness = any(r.top_eigenvalue is not None for r in a.batches)
    sharp_section = Section("Sharpness", paragraphs=[sharp_par if has_sharpness else
                                                     "Not measured in this sweep (--no-sharpness, or no trial finished)."],
                            figures=[_sharpness_figure(a, sharpness_mode)] if has_sharpness else [])
    return [
        Section("Summary", paragraphs=summary + plan_lines(a, trials), caveats=list(a.notes)),
        Section("Per batch (best LR): time to target", table=table),
        Section("Per batch (best LR): metric, gap and sharpness", table=quality),
        steps_section,
        Section("Scaling regimes (Shallue et al. 2019)", table=regimes if a.regimes else None,
                paragraphs=["Perfect: slope ≥ 0.8; no gain: slope ≤ 0.1; diminishing in between."
                            + ("" if a.regimes else " No two neighbouring batches both reached the target.")]),
        examples_section,
        val_section,
        sharp_section,
        Section("All trials", table=[trial_head] + trial_rows),
    ]


def write_sweep_report(path: str | Path, analysis: SweepAnalysis, trials: Sequence[dict], *, workload: str,
                       sharpness_mode: str = "eval") -> Path:
    """Write the sweep's self-contained ``report.html``."""
    return write_html(path, f"batchpilot sweep: {workload}", build_sections(analysis, trials, sharpness_mode=sharpness_mode),
                      subtitle=f"{len(trials)} trials")
