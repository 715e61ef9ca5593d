"""``batchpilot plan``: measure the workload and choose the goodput-optimal batch, LR and warmup.

With no arguments it plans the built-in default workload on this machine's CPU and writes
``./plan.json`` and ``./report.html`` (``--out DIR`` writes them to DIR instead).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from batchpilot.cli.common import add_workload_args, load_workload, print_json, workload_name, workload_options
from batchpilot.errors import BatchpilotError
from batchpilot.scaling.lr_rules import LR_RULES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="choose the goodput-optimal batch, LR, warmup and accumulation from measurements",
                       description="Measure memory, throughput and the gradient noise scale, then choose the "
                                   "(micro-batch, accumulation) with the highest goodput. Writes plan.json and "
                                   "report.html to --out (default: the current directory).")
    add_workload_args(p)
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="cpu, cuda, a GPU name (H100, A100-40GB, ...) or a size (default: cpu)")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="device memory overriding the device's, e.g. 24GiB (default: the device's)")
    p.add_argument("--world-size", default="1", metavar="N[,N...]",
                   help="data-parallel ranks (default 1), or a list such as 1,2,4,8: plan at each, recommend one, and "
                        "list how the global batch splits at other sizes")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                   help="ddp: replicated (default); fsdp: FSDP2, memory per rank traced at each world size, all-gathers "
                        "and reduce-scatters in the step time, DDP compared where it fits (docs/fsdp.md)")
    p.add_argument("--reshard-after-forward", action=argparse.BooleanOptionalAction, default=True,
                   help="fsdp: gather each block again in the backward (ZeRO-3, default) or keep it (ZeRO-2-like)")
    p.add_argument("--allreduce-gbps", type=float, default=None, metavar="GB/S",
                   help="all-reduce bus bandwidth for world sizes > 1 (default: measured between two gloo processes here)")
    p.add_argument("--lr-rule", choices=LR_RULES, default=None, help="LR scaling rule (default: sqrt for Adam-type, linear otherwise)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads for the measurements, recorded in the plan (default: chosen by measuring)")
    p.add_argument("--probe-budget", "--noise-budget", dest="noise_budget", type=float, default=30.0, metavar="SECONDS",
                   help="most training time for the noise probe at the base batch; it stops at the target if that "
                        "comes first and never needs to reach it (default 30)")
    p.add_argument("--throughput-budget", type=float, default=20.0, metavar="SECONDS",
                   help="time for the interleaved throughput rounds (default 20)")
    p.add_argument("--no-lr-check", dest="lr_check", action="store_false",
                   help="trust the workload's base LR instead of checking it with short runs at 0.25x-8x")
    p.add_argument("--lr-check-budget", type=float, default=15.0, metavar="SECONDS",
                   help="time for the base-LR check (default 15)")
    p.add_argument("--confirm", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the critical batch with short runs at 4x and 16x the base batch to the loss the probe "
                        "reached halfway, and plan with it; --no-confirm plans from the noise scale B_simple alone")
    p.add_argument("--confirm-budget", type=float, default=40.0, metavar="SECONDS",
                   help="time for the --confirm runs (default 40)")
    p.add_argument("--amp", default=None, metavar="bf16|fp16",
                   help="plan for autocast mixed precision: memory traced, throughput and MFU at the half-precision "
                        "peak; train --plan trains with it (fp16 only on CUDA; default: fp32)")
    p.add_argument("--noise-scale", "--b-noise", dest="noise_scale", type=float, default=None, metavar="SAMPLES",
                   help="a GIVEN gradient noise scale: no noise probe or confirmation runs (marked given in the plan); "
                        "a memory-only workload (hf:gpt2) without it plans on throughput alone")
    p.add_argument("--calibration", default=None, metavar="GPU_CHECK_JSON",
                   help="scale predicted step times by the efficiency factor bench/gpu_check.py measured on a GPU, "
                        "and use its band (default: the documented x1.5 band)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the measurements' models and data order")
    p.add_argument("--out", default=".", metavar="DIR", help="directory for plan.json and report.html (default: .)")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--json", action="store_true", help="print the plan as JSON on stdout instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from batchpilot.plan import make_plan

    for name in ("noise_budget", "throughput_budget", "lr_check_budget", "confirm_budget"):
        if not (getattr(args, name) > 0 and math.isfinite(getattr(args, name))):
            raise BatchpilotError(f"--{name.replace('_', '-')} must be a finite number of seconds > 0, "
                                  f"got {getattr(args, name)!r}")
    if args.threads is not None:
        if args.threads < 1:
            raise BatchpilotError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    from batchpilot.cli.outputs import check_out_dir

    out = check_out_dir(args.out)
    from batchpilot.plan.worlds import parse_world_sizes

    sizes = parse_world_sizes(args.world_size)
    if args.allreduce_gbps is not None and not args.allreduce_gbps > 0:
        raise BatchpilotError(f"--allreduce-gbps must be > 0, got {args.allreduce_gbps!r}")
    from batchpilot.memory import resolve_device

    from batchpilot.plan.no_training import plans_without_training
    from batchpilot.throughput.amp import parse_amp

    amp = parse_amp(args.amp)
    from batchpilot.throughput.band import load_calibration

    calibration = load_calibration(args.calibration, amp=amp is not None) if args.calibration is not None else None
    resolve_device(args.device, args.memory)  # an unknown device or size fails before any measurement
    workload = load_workload(args, None if plans_without_training(args.device, args.memory) else "plan")
    import dataclasses

    from batchpilot.plan.workload_spec import describe, run_command

    spec = describe(workload_name(args), workload_options(args))
    failed = None
    with _progress() as progress:
        plan = make_plan(workload, device=args.device, memory=args.memory, world_size=sizes[0],
                         world_sizes=sizes if len(sizes) > 1 else None, allreduce_gbps=args.allreduce_gbps,
                         lr_rule=args.lr_rule, noise_budget_s=args.noise_budget,
                         throughput_budget_s=args.throughput_budget, lr_check=args.lr_check,
                         lr_check_budget_s=args.lr_check_budget, confirm=args.confirm,
                         confirm_budget_s=args.confirm_budget, threads=args.threads, seed=args.seed,
                         progress=progress, amp=amp, noise_scale=args.noise_scale, calibration=calibration,
                         strategy=args.strategy, reshard_after_forward=args.reshard_after_forward)
        plan = dataclasses.replace(plan, workload_spec=spec)
        failed = _write_outputs(plan, out, report=not args.no_report, progress=progress)
    plan_json = out / "plan.json"
    command = run_command(plan_json, spec)
    if args.json:
        print_json(plan.to_dict())
    else:
        render_plan(plan.to_dict(), out, report=not args.no_report, written=failed is None)
    if failed:
        from batchpilot.cli.outputs import report_write_failure

        report_write_failure("plan", failed)
        return 2
    if plan.memory_only:  # train --plan refuses it: say so instead of printing a command that fails
        command = f"not runnable: {plan.workload} is memory-only; train it on data (--workload-opt data=PATH) and plan that"
        print(command, file=sys.stderr if args.json else sys.stdout)
    elif args.json:
        print(f"run it with: {command}", file=sys.stderr)
    else:
        print(f"run it with: {command}")
    return 0


def _write_outputs(plan, out: Path, *, report: bool, progress) -> str | None:
    """Write plan.json (and report.html); on an OS error keep the plan elsewhere and return the message."""
    from batchpilot.cli.outputs import save_or_fallback
    from batchpilot.plan import write_plan

    data = plan.to_dict()
    failed = save_or_fallback(lambda: write_plan(plan, out / "plan.json"), data, verb="plan",
                              what=f"{out / 'plan.json'}", name="plan.json")
    if failed or not report:
        return failed
    from batchpilot.report.plan_report import write_plan_report

    progress("report: rendering", 0.99)
    try:
        write_plan_report(data, out / "report.html")
    except OSError as exc:
        return f"could not write {out / 'report.html'}: {exc.strerror or exc}; plan.json was written"
    return None


class _progress:
    """A rich progress bar on stderr, driven by ``progress(description, fraction)``."""

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description:<48}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                            TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self.task = self.bar.add_task("plan: starting", total=1.0)
        self.bar.start()
        return self

    def __call__(self, description: str, fraction: float) -> None:
        self.bar.update(self.task, description=description, completed=fraction)

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def render_plan(plan: dict, out: Path, *, report: bool = True, written: bool = True) -> None:
    """The plan as a rich table, with the why and the caveats."""
    from rich.console import Console
    from rich.table import Table

    from batchpilot.report.plan_report import _summary_rows

    console = Console()
    table = Table(title=f"batchpilot plan: {plan['workload']} on {plan['device']}", show_header=False)
    for key, value in _summary_rows(plan)[1:]:
        table.add_row(str(key), str(value))
    for key, value in evidence_rows(plan):
        table.add_row(key, value)
    console.print(table)
    alts = Table(title="alternatives", show_header=True)
    for col in ("", "global batch", "samples/s", "efficiency", "goodput", "pred. time (s)"):
        alts.add_column(col)
    rows = [("chosen", {k: plan[k] for k in ("global_batch", "samples_per_s", "efficiency", "goodput")}
             | {"time_to_target_s": plan["predicted_time_to_target_s"]})]
    rows += [(name.replace("_", " "), a) for name, a in plan["alternatives"].items()]
    for name, a in rows:
        t = a.get("time_to_target_s")
        alts.add_row(name, str(a["global_batch"]), f"{a['samples_per_s']:.0f}", f"{a['efficiency']:.3f}",
                     f"{a['goodput']:.0f}", f"{t:.2f}" if t is not None else "n/a")
    console.print(alts)
    if plan.get("worlds", {}).get("strategy") == "fsdp":
        render_fsdp_worlds(plan["worlds"], console)
    elif plan.get("worlds", {}).get("table"):
        render_worlds(plan["worlds"], console)
    console.print(f"[bold]Why:[/bold] {plan['why']}")
    for c in plan["caveats"]:
        console.print(f"[yellow]caveat:[/yellow] {c}")
    if written:
        files = [str(out / "plan.json")] + ([str(out / "report.html")] if report else [])
        console.print(f"wrote {', '.join(files)}", highlight=False)


def _fmt(value, spec: str) -> str:
    """A number for the table; ``n/a`` where the plan has none (never ``None``)."""
    return "n/a" if value is None else format(value, spec)


def evidence_rows(plan: dict) -> list[tuple[str, str]]:
    """How the plan got its noise scale, base LR and goodput band, and what the measuring cost."""
    rows = []
    noise = plan.get("noise") or {}
    if noise:
        how = {"trend_vs_loss": f"B_simple's trend against the loss, at the target's loss {_fmt(noise.get('loss_at_target'), '.3g')}"
                                f" ({noise.get('loss_at_target_source') or 'source unknown'})",
               "probe_effective": "the probe's phase-weighted B_simple (no trend to fit)",
               "base_batch_fallback": "no usable estimate: the base batch",
               "given": "GIVEN (--noise-scale), not measured",
               "not_measured": "NOT MEASURED: efficiency 1, goodput = throughput"}.get(
            noise.get("method", "").replace("+confirmed", ""), noise.get("method", ""))
        if noise.get("method", "").endswith("+confirmed"):
            conf = noise.get("confirmation") or {}
            b_crit = conf.get("b_crit")
            how = (f"B_crit fitted from short runs at batches {conf.get('batches')} to a common loss"
                   + (" (samples did not grow: beyond the batches tried)" if b_crit is None else "")
                   + f"; B_simple's estimate was {_fmt(noise.get('b_trend_at_target') or noise.get('b_simple_effective'), ',.0f')}")
        rows.append(("noise scale used", f"{_fmt(plan.get('noise_scale'), ',.0f')} samples: {how}"))
    if plan.get("lr_check"):
        rows.append(("base LR check", plan["lr_check"]["note"]))
    band = plan.get("goodput_band") or ()
    if len(band) == 2 and band[1]:
        tied = plan.get("tied_batches") or []
        predicted = str(plan.get("goodput_band_source", "")).startswith("PREDICTED")
        rows.append((f"goodput band ({'PREDICTED step time' if predicted else 'timing'})",
                     f"{band[0]:,.0f}–{band[1]:,.0f} useful samples/s"
                     + (f"; tied batches {', '.join(str(b) for b in tied)}" if len(tied) > 1 else "")))
    for stage, why in (plan.get("skipped") or {}).items():
        rows.append((f"{stage.replace('_', ' ')} skipped", why))
    if plan.get("probe_cost_s"):
        rows.append(("training spent measuring", f"{plan['probe_cost_s']:.1f} s (LR check, noise probe, confirmation)"))
    return rows


def render_worlds(worlds: dict, console) -> None:
    """The world-size table: the best split at each size, and how the chosen batch splits elsewhere."""
    from rich.table import Table

    table = Table(title=f"world sizes (recommended: {worlds['recommended']}; all-reduce {worlds['comm']['source']})")
    for col in ("ranks", "micro×acc", "batch", "step ms", "comm ms", "goodput", "speedup", "time s"):
        table.add_column(col, no_wrap=True)
    for r in worlds["table"]:
        t = r.get("time_to_target_s")
        table.add_row(str(r["world_size"]), f"{r['micro_batch_per_rank']}×{r['accumulation_steps']}",
                      str(r["global_batch"]), f"{r['step_s'] * 1e3:.2f}", f"{r['allreduce_s'] * 1e3:.2f}",
                      f"{r['goodput']:.0f}", f"{r['speedup']:.2f}x", f"{t:.2f}" if t is not None else "n/a")
    console.print(table)
    splits = ", ".join(f"{e['world_size']}: {e['micro_batch_per_rank']} x {e['accumulation_steps']}" if e["compatible"]
                       else f"{e['world_size']}: incompatible" for e in worlds.get("elastic", []))
    console.print(f"the chosen global batch at other world sizes (ranks: micro x accumulation): {splits}; it divides "
                  f"over {len(worlds.get('compatible_world_sizes', []))} world sizes up to 1024")


def render_fsdp_worlds(worlds: dict, console) -> None:
    """The FSDP world-size table, with DDP's best beside it where the replicated step fits."""
    from rich.table import Table

    mode = "ZeRO-3" if worlds.get("reshard_after_forward", True) else "ZeRO-2-like"
    table = Table(title=f"fsdp ({mode}) by world size (recommended: {worlds['recommended']}; link "
                        f"{worlds['comm']['source']})")
    for col in ("ranks", "max micro", "micro×acc", "batch", "step ms", "AG+RS ms", "goodput", "ddp goodput", "faster"):
        table.add_column(col, no_wrap=True)
    for r in worlds["table"]:
        ddp = r.get("ddp")
        table.add_row(str(r["world_size"]), str(r["max_micro_batch_per_rank"]),
                      f"{r['micro_batch_per_rank']}×{r['accumulation_steps']}", str(r["global_batch"]),
                      f"{r['step_s'] * 1e3:.2f}", f"{r['comm_s'] * 1e3:.2f}", f"{r['goodput']:.0f}",
                      f"{ddp['goodput']:.0f}" if ddp else "does not fit", r["faster"])
    console.print(table)
    if worlds.get("not_fitting"):
        console.print(f"no micro-batch fits under fsdp at {', '.join(map(str, worlds['not_fitting']))} rank(s)")
    console.print(f"FSDP units: {', '.join(worlds['units'])}")


def _split_for(plan: dict, world: int, path: str) -> dict:
    """The plan's global batch at ``world`` ranks: its listed split (``plan --world-size``), else the largest
    micro-batch <= the plan's that divides the per-rank batch."""
    batch = plan["global_batch"]
    if batch % world:
        raise BatchpilotError(f"plan {path!r} has global batch {batch}, which does not divide over {world} ranks; "
                              f"plan again with --world-size {world}")
    split = next((e for e in (plan.get("worlds") or {}).get("elastic", []) if e["world_size"] == world and e["compatible"]),
                 None)
    if split is None:
        per_rank = batch // world
        micro = max(d for d in range(1, min(per_rank, plan["micro_batch_per_rank"]) + 1) if per_rank % d == 0)
        split = {"micro_batch_per_rank": micro, "accumulation_steps": per_rank // micro}
    return {"world_size": world, "micro_batch_per_rank": split["micro_batch_per_rank"],
            "accumulation_steps": split["accumulation_steps"]}


def apply_plan_to_train_args(args: argparse.Namespace) -> dict:
    """Fill ``batchpilot train`` arguments from ``--plan plan.json``; flags given explicitly win.

    Sets the workload from the plan's ``workload_spec`` (:func:`batchpilot.plan.workload_spec.workload_for_run`:
    a built-in as recorded; the user's own code only when ``--workload`` names it again, or with
    ``--trust-plan-workload``), batch, micro-batch, LR, LR rule and warmup; ``--amp``; FSDP (``--strategy fsdp``
    and its resharding) when the plan was made for it and this run has two ranks or more; the CPU thread count
    the plan was measured with; and, when no ``--steps/--epochs``
    is given and the plan predicts the steps to its target, 1.5x that many steps with an evaluation
    every ~5% of them. Returns the plan's data.

    Raises:
        BatchpilotError: an unreadable/inconsistent plan, a different ``--workload``, user code not named on
            the command line, an ``hf:*`` (memory-only) workload, or a global batch that
            does not divide over this run's ranks (torchrun's, or ``--nproc``).
    """
    import json
    import math

    import torch

    from batchpilot.cli.common import DEFAULT_WORKLOAD, refuse_memory_only, workload_options
    from batchpilot.plan import read_plan
    from batchpilot.plan.workload_spec import workload_for_run
    from batchpilot.train.distributed import torchrun_env

    plan = read_plan(args.plan)
    world = getattr(args, "nproc", None) or torchrun_env().world_size
    if plan["world_size"] != world:  # the same global batch at another world size: only the split changes
        plan = {**plan, **_split_for(plan, world, args.plan)}
    if plan.get("memory_only"):
        raise BatchpilotError(f"plan {args.plan!r} is for the memory-only workload {plan.get('workload')!r}: it was made "
                              "from traced memory and a predicted step time, with no training data; train the model "
                              "on data (--workload-opt data=PATH), and plan that workload to run it")
    if getattr(args, "amp", None) is None and plan.get("amp"):
        args.amp = plan["amp"]
    worlds = plan.get("worlds") or {}
    if getattr(args, "strategy", None) is None and worlds.get("strategy") == "fsdp" and world > 1:
        args.strategy = "fsdp"  # the plan's batch split was sized for sharded memory per rank
        args.reshard_after_forward = bool(worlds.get("reshard_after_forward", True))
    name, options = workload_for_run(plan, args.plan, args.workload, workload_options(args),
                                     trust=getattr(args, "trust_plan_workload", False), default=DEFAULT_WORKLOAD)
    refuse_memory_only(name, "train")
    args.workload = name
    args.workload_opt = [f"{k}={json.dumps(v)}" for k, v in options.items()]
    if args.batch is None:
        args.batch = plan["global_batch"]
    if args.micro_batch is None and args.batch == plan["global_batch"]:
        args.micro_batch = plan["micro_batch_per_rank"]
    if args.lr is None and args.lr_rule is None:
        if args.batch == plan["global_batch"]:
            args.lr = float(plan["lr"])
        elif plan.get("base_lr") and plan.get("base_batch"):  # scale from the plan's (checked) base LR
            from batchpilot.scaling.lr_rules import scale_lr

            args.lr = scale_lr(float(plan["base_lr"]), int(plan["base_batch"]), args.batch, plan["lr_rule"])
        else:
            args.lr_rule = plan["lr_rule"]
    if args.warmup_steps == 0:
        args.warmup_steps = int(plan["warmup_steps"])
    if plan.get("threads") and getattr(args, "threads", None) is None:
        torch.set_num_threads(int(plan["threads"]))
    predicted = plan.get("predicted_steps_to_target")
    if args.steps is None and args.epochs is None and predicted:
        args.steps = math.ceil(1.5 * predicted)
        if args.eval_every is None:
            args.eval_every = max(1, predicted // 20)
    return plan
