"""``batchpilot sweep``: train at several batch sizes and check the plan against reality."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from batchpilot.cli.common import _clean, add_workload_args, print_json
from batchpilot.errors import EXIT_FINDINGS, EXIT_INTERRUPTED, BatchpilotError
from batchpilot.files import atomic_write_json
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
                                   "as it finishes (a SQLite file, or a PostgreSQL server shared by workers on several "
                                   "machines); rerunning resumes. Exit codes: 0 ok, 1 some trials failed or were left "
                                   "unfinished, 2 bad input, 130 interrupted.")
    add_workload_args(p, plan_aware=True)
    p.add_argument("--batches", required=True, metavar="B[,B...]",
                   help="global batches: '32,64,128' or '16,32,...,1024' (required)")
    p.add_argument("--lr-rule", choices=LR_RULES, default=None, help="LR scaling from the base point (default: by optimizer)")
    p.add_argument("--lr-multipliers", default="1", metavar="X[,X...]",
                   help="LR multipliers tried at each batch, e.g. 0.5,1,2; each batch keeps its best")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds per (batch, multiplier)")
    p.add_argument("--target", default=None, metavar="METRIC>=X", help="e.g. 'val_acc>=0.9' (default: the workload's)")
    p.add_argument("--max-epochs", type=float, default=10.0, metavar="E", help="training length of each trial in epochs (default 10)")
    p.add_argument("--warmup-epochs", type=float, default=0.5, metavar="E",
                   help="linear warmup in epochs when the LR is scaled above the base LR (default 0.5; 0 = none)")
    p.add_argument("--evals-per-epoch", type=int, default=16, metavar="N",
                   help="validation passes per epoch (steps-to-target resolution)")
    p.add_argument("--stop-at-target", action="store_true", help="end each trial at the target (final metrics are then at the target)")
    p.add_argument("--no-sharpness", action="store_true", help="skip the Hessian eigenvalue and trace")
    p.add_argument("--sharpness-mode", choices=("eval", "train"), default="eval", help="module mode for the Hessian (default eval)")
    p.add_argument("--sharpness-samples", type=int, default=256, metavar="N", help="training samples in the Hessian's loss")
    p.add_argument("--gap-threshold", type=float, default=0.02, metavar="X",
                   help="gap rule: flag batches this far below the best (default 0.02)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads for every trial (default: the plan's with --plan, else torch's)")
    p.add_argument("--time-basis", choices=("measured", "median_step"), default="measured",
                   help="time to target: measured training time, or steps x median step time (robust on a busy machine)")
    p.add_argument("--store", default="sweep.db", metavar="DB|URL",
                   help="trial store: a SQLite file (default sweep.db; also sqlite:///path) on this machine, or "
                        "postgresql://user@host[:port]/db shared by workers on several machines; rerun to resume")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes on this machine, sharing the grid through the store (default 1); each gets "
                        "its share of the CPU threads (cores/N) unless --threads says otherwise")
    p.add_argument("--lease", type=float, default=120.0, metavar="S",
                   help="seconds after its last heartbeat that a running trial is given to another worker (a dead worker "
                        "on this machine frees its trial at once; default 120)")
    p.add_argument("--plan", default=None, metavar="PLAN_JSON",
                   help="plan.json from 'batchpilot plan': its configuration runs as a trial and is marked (default: none)")
    p.add_argument("--trust-plan-workload", action="store_true",
                   help="with --plan: run the plan's own workload code (file.py:fn / pkg.module:fn) without naming it "
                        "with --workload; off by default, because only code named on the command line runs")
    p.add_argument("--out", default=None, metavar="DIR", help="directory for report.html and sweep.json (default: write nothing)")
    p.add_argument("--log", action="append", default=None, metavar="KIND",
                   help="log every trial's steps as its own run: tensorboard, csv or jsonl (repeat for several), "
                        "under --log-dir (default: --out/runs)")
    p.add_argument("--log-dir", default=None, metavar="DIR", help="directory of the trials' runs for --log")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _workload_options(args: argparse.Namespace) -> dict:
    from batchpilot.cli.common import workload_options

    return workload_options(args)


def build_config(args: argparse.Namespace):
    """The :class:`SweepConfig` (and the plan, if any) the flags describe."""
    from batchpilot.plan.result import read_plan
    from batchpilot.sweep.runner import SweepConfig, with_plan_trial

    from batchpilot.cli.common import DEFAULT_WORKLOAD, refuse_memory_only, workload_name

    plan = read_plan(args.plan) if args.plan is not None else None
    name, options = workload_name(args), _workload_options(args)
    if plan is not None:
        from batchpilot.plan.workload_spec import workload_for_run

        name, options = workload_for_run(plan, args.plan, args.workload, options,
                                         trust=getattr(args, "trust_plan_workload", False), default=DEFAULT_WORKLOAD)
    refuse_memory_only(name, "sweep")
    batches = parse_batches(args.batches)
    if not batches or any(b < 1 for b in batches):
        raise BatchpilotError(f"--batches must be positive integers, got {args.batches!r}")
    multipliers = parse_floats(args.lr_multipliers, "--lr-multipliers")
    if not multipliers or not all(math.isfinite(m) and m > 0 for m in multipliers):
        raise BatchpilotError(f"--lr-multipliers must be finite numbers > 0, got {args.lr_multipliers!r}")
    threads = args.threads if args.threads is not None else (plan.get("threads") if plan else None)
    config = SweepConfig(workload=name, workload_options=options, batches=batches,
                         lr_rule=args.lr_rule, lr_multipliers=multipliers,
                         seeds=args.seeds, target=args.target, max_epochs=args.max_epochs, warmup_epochs=args.warmup_epochs,
                         evals_per_epoch=args.evals_per_epoch, stop_at_target=args.stop_at_target,
                         sharpness=not args.no_sharpness, sharpness_mode=args.sharpness_mode,
                         sharpness_samples=args.sharpness_samples, threads=threads)
    if plan is not None:
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
        elif kind == "invalid":  # a damaged stored row: skipped, its trial runs again
            from rich.markup import escape

            what = f"batch {t.batch} lr×{t.lr_multiplier:g} seed {t.seed}" if t is not None else f"row {info['key'][:12]}"
            self.bar.console.print(f"[yellow]store: {escape(what)}: {escape(info['reason'])}")

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()


def result_data(outcome, analysis, store_path: str, workers: list | None = None) -> dict:
    """The JSON document: config, counts, trials and analysis (and, with --workers, what each worker did)."""
    from batchpilot.sweep.analysis import as_jsonable

    data = {"sweep": as_jsonable(outcome.config), "store": store_path, "ran": outcome.ran, "skipped": outcome.skipped,
            "failed": list(outcome.failed), "wall_s": outcome.wall_s, "trials": list(outcome.trials),
            "analysis": as_jsonable(analysis) if analysis is not None else None}
    if workers is not None:
        data["workers"] = [{"pid": w.pid, "exit_code": w.exitcode, "ran": w.ran, "failed": len(w.failed), "error": w.error}
                           for w in workers]
    return _clean(data)


def run(args: argparse.Namespace) -> int:
    from batchpilot.sweep.backends import is_server_store, open_store
    from batchpilot.sweep.runner import run_sweep
    from batchpilot.sweep.analysis import analyze
    from batchpilot.sweep.store import store_path

    from batchpilot.cli.outputs import check_out_dir, check_out_file

    check_out_dir(args.out)
    server = is_server_store(args.store)
    if not server:
        check_out_file(store_path(args.store), "--store")  # (an unsupported URL scheme is refused here)
    workers = args.workers
    if isinstance(workers, bool) or workers < 1:
        raise BatchpilotError(f"--workers must be an integer >= 1, got {workers!r}")
    if not (args.lease > 0 and math.isfinite(args.lease)):
        raise BatchpilotError(f"--lease must be a number of seconds > 0, got {args.lease!r}")
    log = _trial_log(args)
    config, plan = build_config(args)
    if workers > 1 and args.threads is None:
        from dataclasses import replace

        from batchpilot.sweep.workers import cpu_share

        config = replace(config, threads=cpu_share(workers))
        if server:
            print(f"batchpilot sweep: note: {workers} workers x {config.threads} thread(s) each; a trial's thread count is "
                  "part of its identity, so give the same --threads on every machine that shares this store",
                  file=sys.stderr)
    if not (args.gap_threshold >= 0 and math.isfinite(args.gap_threshold)):
        raise BatchpilotError(f"--gap-threshold must be a finite number >= 0, got {args.gap_threshold!r}")
    workload = _checked_workload(config)  # a bad workload or a batch above the training set fails before the store opens
    heartbeat_s = max(0.05, min(10.0, args.lease / 4))
    reports = None
    with open_store(args.store, stale_after_s=args.lease) as store:  # made (or checked) before any worker starts
        try:
            if workers == 1:
                extra = {}
                if log is not None:
                    from batchpilot.sweep.runner import result_problem
                    from batchpilot.sweep.trial_log import logged_execute

                    extra = {"execute": logged_execute(*log), "check_result": result_problem}
                with _Progress() as progress:
                    outcome = run_sweep(config, store, workload=workload, on_event=progress, heartbeat_s=heartbeat_s,
                                        **extra)
            else:
                outcome, reports, unfinished = _run_workers(config, args.store, store, workers, args.lease, heartbeat_s,
                                                            log)
        except KeyboardInterrupt:
            print("batchpilot sweep: interrupted; finished trials are stored, rerun the same command to resume",
                  file=sys.stderr)  # (stdout may be --json)
            return EXIT_INTERRUPTED
        where = store.where
    if reports is not None and unfinished:
        errors = [f"worker {w.index + 1}: {w.error}" for w in reports if w.error]
        print(f"batchpilot sweep: {len(unfinished)} trial(s) not finished"
              + (f" ({'; '.join(errors)})" if errors else "") + "; rerun the same command to resume", file=sys.stderr)
    analysis = analyze(outcome.trials, plan=plan, gap_threshold=args.gap_threshold, time_basis=args.time_basis) if outcome.trials else None
    data = result_data(outcome, analysis, where, reports)
    failed = None
    if args.out:
        from batchpilot.cli.outputs import save_or_fallback
        from batchpilot.report.sweep_report import write_sweep_report

        out = Path(args.out)

        def write() -> None:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "sweep.json", data)
            if analysis is not None:
                write_sweep_report(out / "report.html", analysis, outcome.trials, workload=config.workload,
                                   sharpness_mode=config.sharpness_mode)

        failed = save_or_fallback(write, data, verb="sweep", what=str(out / "sweep.json"), name="sweep.json")
    if args.json:
        print_json(data)
    else:
        render(outcome, analysis)
    if failed:
        from batchpilot.cli.outputs import report_write_failure

        report_write_failure("sweep", failed + f" (the trials are also in the store {where})")
        return 2
    return EXIT_FINDINGS if outcome.failed or (reports is not None and unfinished) else 0


def _trial_log(args: argparse.Namespace):
    """``--log``: ``(kinds, directory)`` for the trials' runs, or ``None``."""
    from batchpilot.train.metrics_log import parse_log_kinds, require_tensorboard

    kinds = parse_log_kinds(args.log)
    if args.log and not kinds:
        raise BatchpilotError(f"--log must be one of tensorboard, csv, jsonl (several allowed), got {args.log[-1]!r}")
    if not kinds:
        if args.log_dir is not None:
            raise BatchpilotError("--log-dir needs --log tensorboard|csv|jsonl")
        return None
    if args.log_dir is None and not args.out:
        raise BatchpilotError("--log needs a directory for the trials' runs: --log-dir DIR or --out DIR")
    from batchpilot.cli.outputs import check_out_dir

    if args.log_dir is not None:
        check_out_dir(args.log_dir, "--log-dir")
        log_dir = args.log_dir
    else:
        log_dir = str(Path(args.out) / "runs")
        check_out_dir(log_dir)
    if "tensorboard" in kinds:
        require_tensorboard()
    return kinds, log_dir


def _run_workers(config, store_spec: str, store, workers: int, lease_s: float, heartbeat_s: float, log=None):
    """``--workers N``: N local processes share the grid through the store; then every trial is read back."""
    import time

    from batchpilot.sweep.workers import collect, run_workers

    t0 = time.perf_counter()
    print(f"batchpilot sweep: {workers} workers x {config.threads} thread(s) on {store.where}", file=sys.stderr)
    reports = run_workers(config, store_spec, workers, lease_s=lease_s, heartbeat_s=heartbeat_s, log=log)
    failed = tuple(f for w in reports for f in w.failed)
    outcome, unfinished = collect(config, store, ran=sum(w.ran for w in reports), failed=failed,
                                  wall_s=time.perf_counter() - t0)
    if all(w.exitcode == 2 and w.error for w in reports):  # bad input every worker met: one line, exit 2
        raise BatchpilotError(reports[0].error)
    return outcome, reports, unfinished


def _checked_workload(config):
    """Build the sweep's workload and check every batch against its training set."""
    from batchpilot.cli.common import load_workload

    ns = argparse.Namespace(workload=config.workload, workload_opt=[f"{k}={json.dumps(v)}" for k, v in
                                                                    config.workload_options.items()])
    workload = load_workload(ns, "sweep")
    batches = sorted({*config.batches, *(t.batch for t in config.extra_trials)})
    too_big = [b for b in batches if b > workload.num_train]
    if too_big:
        raise BatchpilotError(f"batch {too_big[0]} is larger than the training set of {config.workload!r} "
                              f"({workload.num_train} samples); expected batches <= {workload.num_train}")
    return workload


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
