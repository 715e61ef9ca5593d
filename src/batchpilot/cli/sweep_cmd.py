"""``batchpilot sweep``: train at several batch sizes and check the plan against reality."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from batchpilot.cli.common import _clean, add_workload_args, print_json
from batchpilot.errors import EXIT_FINDINGS, EXIT_INTERRUPTED, BatchpilotError
from batchpilot.scaling.lr_rules import LR_RULES


def parse_batches(text: str) -> tuple[int, ...]:
    """``'32,64,128'``, or a geometric run ``'16,32,...,1024'`` (ratio from the first two)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if "..." in parts:
            i = parts.index("...")
            if i != 2 or len(parts) != 4:
                raise ValueError
            a, b, end = int(parts[0]), int(parts[1]), int(parts[3])
            if not (0 < a < b <= end) or b % a:
                raise ValueError
            out, x = [], a
            while x <= end:
                out.append(x)
                x *= b // a
            return tuple(out)
        return tuple(int(p) for p in parts)
    except ValueError:
        raise BatchpilotError(f"--batches must be integers like '32,64,128' or '16,32,...,1024', got {text!r}") from None


def parse_floats(text: str, name: str) -> tuple[float, ...]:
    """Comma-separated floats."""
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise BatchpilotError(f"{name} must be numbers like '0.5,1,2', got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train at several batch sizes: steps/time to target, generalization gap, sharpness",
                       description="Sweep batch sizes with the reference trainer (Shallue et al. 2019). Every trial is stored "
                                   "in SQLite as it finishes; rerunning resumes. Exit codes: 0 ok, 1 some trials failed, "
                                   "2 bad input, 130 interrupted.")
    add_workload_args(p)
    p.add_argument("--batches", required=True, help="global batches: '32,64,128' or '16,32,...,1024'")
    p.add_argument("--lr-rule", choices=LR_RULES, default=None, help="LR scaling from the base point (default: by optimizer)")
    p.add_argument("--lr-multipliers", default="1", help="LR multipliers tried at each batch, e.g. 0.5,1,2; each batch keeps its best")
    p.add_argument("--seeds", type=int, default=1, help="seeds per (batch, multiplier)")
    p.add_argument("--target", default=None, help="e.g. 'val_acc>=0.9' (default: the workload's)")
    p.add_argument("--max-epochs", type=float, default=10.0, help="training length of each trial in epochs (default 10)")
    p.add_argument("--warmup-epochs", type=float, default=0.5,
                   help="linear warmup in epochs when the LR is scaled above the base LR (default 0.5; 0 = none)")
    p.add_argument("--evals-per-epoch", type=int, default=16, help="validation passes per epoch (steps-to-target resolution)")
    p.add_argument("--stop-at-target", action="store_true", help="end each trial at the target (final metrics are then at the target)")
    p.add_argument("--no-sharpness", action="store_true", help="skip the Hessian eigenvalue and trace")
    p.add_argument("--sharpness-mode", choices=("eval", "train"), default="eval", help="module mode for the Hessian (default eval)")
    p.add_argument("--sharpness-samples", type=int, default=256, help="training samples in the Hessian's loss")
    p.add_argument("--gap-threshold", type=float, default=0.02, help="gap rule: flag batches this far below the best (default 0.02)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for every trial (default: the plan's with --plan, else torch's)")
    p.add_argument("--time-basis", choices=("measured", "median_step"), default="measured",
                   help="time to target: measured training time, or steps x median step time (robust on a busy machine)")
    p.add_argument("--store", default="sweep.db", help="SQLite trial store (default sweep.db); rerun to resume")
    p.add_argument("--plan", default=None, help="plan.json from 'batchpilot plan': its configuration runs as a trial and is marked")
    p.add_argument("--out", default=None, help="directory for report.html and sweep.json")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _workload_options(args: argparse.Namespace) -> dict:
    from batchpilot.cli.common import _parse_value

    opts = {}
    for item in args.workload_opt:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BatchpilotError(f"--workload-opt must be KEY=VALUE, got {item!r}")
        opts[key] = _parse_value(value)
    return opts


def build_config(args: argparse.Namespace):
    """The :class:`SweepConfig` (and the plan, if any) the flags describe."""
    from batchpilot.plan.result import read_plan
    from batchpilot.sweep.runner import SweepConfig, with_plan_trial

    plan = read_plan(args.plan) if args.plan else None
    threads = args.threads if args.threads is not None else (plan.get("threads") if plan else None)
    config = SweepConfig(workload=args.workload, workload_options=_workload_options(args), batches=parse_batches(args.batches),
                         lr_rule=args.lr_rule, lr_multipliers=parse_floats(args.lr_multipliers, "--lr-multipliers"),
                         seeds=args.seeds, target=args.target, max_epochs=args.max_epochs, warmup_epochs=args.warmup_epochs,
                         evals_per_epoch=args.evals_per_epoch, stop_at_target=args.stop_at_target,
                         sharpness=not args.no_sharpness, sharpness_mode=args.sharpness_mode,
                         sharpness_samples=args.sharpness_samples, threads=threads)
    if plan is not None:
        if plan.get("workload") not in (None, args.workload):
            raise BatchpilotError(f"plan {args.plan!r} is for workload {plan['workload']!r}, not {args.workload!r}")
        config, _ = with_plan_trial(config, plan)
    return config, plan


class _Progress:
    """Rich progress on stderr: one bar for the trials, one for the running trial's steps."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=True)
        self.trials = self.bar.add_task("trials", total=None)
        self.steps = self.bar.add_task("", total=None, visible=False)
        self.console = Console(stderr=True)

    def __call__(self, kind: str, info: dict) -> None:
        t = info.get("trial")
        if kind in ("start", "skip", "finish") and "total" in info:
            self.bar.update(self.trials, total=info["total"])
        if kind == "start":
            self.bar.update(self.steps, description=f"batch {t.batch} lr×{t.lr_multiplier:g} seed {t.seed} ({t.tag})",
                            completed=0, total=None, visible=True)
        elif kind == "step":
            rec = info["record"]
            self.bar.update(self.steps, completed=rec["step"])
        elif kind in ("skip", "finish", "fail"):
            self.bar.advance(self.trials)
            if kind == "finish":
                r = info["result"]
                self.bar.console.print(f"batch {t.batch} lr×{t.lr_multiplier:g} seed {t.seed}: {r['status']}, "
                                     f"steps→target {r['steps_to_target']}, {r['metric_name']} {r['val_metric']}")
            if kind == "fail":
                self.bar.console.print(f"[red]batch {t.batch} failed: {info['error']}")
        elif kind == "wait":
            self.bar.update(self.steps, description=f"waiting for {len(info['trials'])} trial(s) held by another process",
                            visible=True)

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()


def result_data(outcome, analysis, store_path: str) -> dict:
    """The JSON document: config, counts, trials and analysis."""
    from batchpilot.sweep.analysis import as_jsonable

    return _clean({"sweep": as_jsonable(outcome.config), "store": store_path, "ran": outcome.ran, "skipped": outcome.skipped,
                   "failed": list(outcome.failed), "wall_s": outcome.wall_s, "trials": list(outcome.trials),
                   "analysis": as_jsonable(analysis) if analysis is not None else None})


def run(args: argparse.Namespace) -> int:
    from batchpilot.sweep.store import TrialStore
    from batchpilot.sweep.runner import run_sweep
    from batchpilot.sweep.analysis import analyze

    config, plan = build_config(args)
    if not args.gap_threshold >= 0:
        raise BatchpilotError(f"--gap-threshold must be >= 0, got {args.gap_threshold!r}")
    with TrialStore(args.store) as store:
        try:
            with _Progress() as progress:
                outcome = run_sweep(config, store, on_event=progress)
        except KeyboardInterrupt:
            print("batchpilot sweep: interrupted; finished trials are stored, rerun the same command to resume")
            return EXIT_INTERRUPTED
    analysis = analyze(outcome.trials, plan=plan, gap_threshold=args.gap_threshold, time_basis=args.time_basis) if outcome.trials else None
    data = result_data(outcome, analysis, args.store)
    if args.out:
        from batchpilot.report.sweep_report import write_sweep_report

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        if analysis is not None:
            write_sweep_report(out / "report.html", analysis, outcome.trials, workload=config.workload,
                               sharpness_mode=config.sharpness_mode)
    if args.json:
        print_json(data)
    else:
        render(outcome, analysis)
    return EXIT_FINDINGS if outcome.failed else 0


def render(outcome, analysis) -> None:
    """Rich tables of the per-batch summary and the verdicts."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"sweep: {outcome.ran} trial(s) run, {outcome.skipped} already in the store, {len(outcome.failed)} failed")
    if analysis is None:
        return
    table = Table(title=f"batchpilot sweep: target {analysis.target}")
    for col in ("batch", "LR", "steps→target", "time→target s", analysis.metric_name, "gap", "top eig"):
        table.add_column(col, justify="right")
    f = lambda v, s=".4g": "—" if v is None else format(v, s)  # noqa: E731
    for r in analysis.batches:
        table.add_row(str(r.batch), f(r.lr), f(r.steps_to_target), f(r.time_to_target_s), f(r.best_val_metric),
                      f(r.generalization_gap), f(r.top_eigenvalue))
    console.print(table)
    if analysis.fit is not None:
        console.print(f"B_crit (McCandlish fit) = {analysis.fit.b_crit:.0f}, S_min = {analysis.fit.s_min:.1f}")
    else:
        console.print(f"no McCandlish fit: {analysis.fit_note}")
    for g in analysis.gap_flags:
        console.print(f"[yellow]gap rule: batch {g.batch} is {g.drop:.3f} below the best; hypotheses: {'; '.join(g.hypotheses)}")
    if analysis.plan is not None:
        p = analysis.plan
        console.print(f"plan batch {p.global_batch}: " + (f"time_to_target(plan)/best = {p.time_ratio:.3f}" if p.time_ratio else p.note))
