"""``batchpilot train``: the reference training loop."""

from __future__ import annotations

import argparse
from pathlib import Path

from batchpilot.cli.common import add_dtype_arg, add_workload_args, load_workload, print_json, workload_name
from batchpilot.errors import EXIT_DIVERGED, EXIT_INTERRUPTED, BatchpilotError
from batchpilot.files import atomic_write_text
from batchpilot.optim import OPTIMIZERS
from batchpilot.train.regime import FinetuneRegime, finetune_regime
from batchpilot.scaling.lr_rules import LR_RULES
from batchpilot.scaling.lr_schedules import SCHEDULES
from batchpilot.train import TrainConfig, TrainResult, Trainer
from batchpilot.train.config import DTYPES


ADAPTIVE_DEFAULTS = {"adaptive_estimator": "micro-batch", "adaptive_throughput": "steps", "adaptive_noise_window": 8}
"""The ``--adaptive-*`` flags' values when not given (``all`` is a window of ``None``: the parser keeps it as ``"all"``)."""


def _adaptive_option(args: argparse.Namespace, name: str):
    value = getattr(args, name, None)
    if value is None:
        return ADAPTIVE_DEFAULTS[name]
    return None if value == "all" else value


def _noise_window(text: str) -> int | str:
    """``--adaptive-noise-window``: an integer >= 2, or ``all`` (the monitor's EMAs)."""
    if text.strip().lower() == "all":
        return "all"  # not None, which means "not given"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 (observed steps) or 'all', got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a workload (exact accumulation, checkpoints, resume)",
                       description="Train a workload. Exit codes: 0 ok, 2 bad input, 3 diverged, 130 interrupted.")
    add_workload_args(p, plan_aware=True)
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help="global batch (default: the plan's with --plan, else the workload's base batch)")
    p.add_argument("--micro-batch", type=int, default=None, metavar="N",
                   help="micro-batch per rank; accumulation = batch / (micro-batch x ranks) (default: the whole per-rank batch)")
    lr = p.add_mutually_exclusive_group()
    lr.add_argument("--lr", type=float, default=None, metavar="LR", help="peak LR (default: scaled from the workload's base point)")
    lr.add_argument("--lr-rule", choices=LR_RULES, default=None, help="scale the base LR: linear (SGD) or sqrt (Adam); default by optimizer")
    p.add_argument("--warmup-steps", type=int, default=0, metavar="N", help="linear LR warmup in optimizer steps (default: 0, or the plan's)")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant", help="LR schedule after warmup")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, metavar="N",
                        help="optimizer steps (default: 1.5x the plan's predicted steps with --plan, else --epochs 1)")
    length.add_argument("--epochs", type=float, default=None, metavar="E", help="passes over the training set (default 1)")
    p.add_argument("--grad-clip", type=float, default=None, metavar="NORM", help="clip the accumulated gradient's norm (default: no clipping)")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="EMA of the weights (e.g. 0.999), stepped per optimizer step (default: no EMA)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seeds the model init, dropout and data order")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: the plan's with --plan, else torch's default); small models "
                        "often run many times faster on 1 thread on a busy machine")
    p.add_argument("--eval-every", type=int, default=None, metavar="N", help="evaluate every N steps (default: at the end)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="checkpoint every N steps (needs --out; default: at the end only)")
    p.add_argument("--target", default=None, metavar="METRIC>=X",
                   help="record steps/time to e.g. 'val_acc>=0.85' (default: the workload's)")
    p.add_argument("--stop-at-target", action="store_true", help="stop once the target is reached")
    add_dtype_arg(p, DTYPES, "dtype of the weights and inputs")
    p.add_argument("--amp", default=None, metavar="bf16|fp16",
                   help="autocast mixed precision for the forward and the loss, fp32 weights (default: off, or the "
                        "plan's with --plan); fp16 needs CUDA and a GradScaler, so this CPU trainer takes bf16 only")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="default",
                   help="default: the workload's; lars/lamb: You et al. 2017/2019 (untuned starting LR unless --lr)")
    batching = p.add_mutually_exclusive_group()
    batching.add_argument("--batch-schedule", default=None, metavar="SPEC",
                          help="batch-size schedule, e.g. 'linear:end=512,over=200' or "
                               "'smith:end=800,factor=5,milestones=2/4,unit=epoch'; --batch is the LR's reference batch")
    batching.add_argument("--adaptive", action="store_true",
                          help="move the batch, up or down, with the measured gradient noise scale (goodput, 5%% switching margin)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N", help="largest batch of --adaptive (default min(16 x batch, N/2))")
    p.add_argument("--min-batch", type=int, default=None, metavar="N",
                   help="smallest batch of --adaptive (default max(2, batch // 8)): it can shrink as well as grow")
    # default None: given without --adaptive is an error, not silently ignored (the defaults are ADAPTIVE_DEFAULTS)
    p.add_argument("--adaptive-estimator", choices=("micro-batch", "per-example"), default=None,
                   help="noise monitor of --adaptive: micro-batches (every 4th step split in two), or per-example "
                        "gradient norms (unsplit steps, every step while the batch moves); docs/noise.md "
                        "(default: micro-batch)")
    p.add_argument("--adaptive-throughput", choices=("steps", "probe"), default=None,
                   help="samples/s of --adaptive: steps (a step-time model fitted to the run's own steps) or probe "
                        "(every candidate batch timed on a copy of the model at the first decision); docs/large-batch.md "
                        "(default: steps)")
    p.add_argument("--adaptive-noise-window", type=_noise_window, default=None, metavar="N|all",
                   help="observed steps each --adaptive decision reads the noise scale over (default 8); 'all': the "
                        "monitor's EMAs over the whole run, which lag early in training; docs/large-batch.md")
    p.add_argument("--init-from", default=None, metavar="PATH",
                   help="start from these weights, checkpoint.pt or a state_dict file (default: fresh initialisation)")
    p.add_argument("--finetune", action="store_true",
                   help="fine-tuning regime from --init-from: smaller batch and LR unless given (a hypothesis to confirm by sweep)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory for metrics.jsonl, checkpoint.pt and summary.json (default: write nothing)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoint.pt, metrics.jsonl and summary.json); "
                        "without it (or --resume) such an --out is refused")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--log", action="append", default=None, metavar="KIND",
                   help="also log every step to tensorboard (event files), csv (metrics.csv) or jsonl (steps.jsonl) "
                        "under --log-dir: loss, LR, batch, samples/s, evaluations, and the noise scale with its "
                        "interval at every step it is measured; repeat (or comma-separate) for several")
    p.add_argument("--log-dir", default=None, metavar="DIR", help="directory for --log (default: --out)")
    p.add_argument("--noise-scale", action="store_true",
                   help="measure the gradient noise scale B_simple while training (from the DDP ranks, from the "
                        "micro-batches under accumulation, else from per-example gradient norms); in metrics.jsonl "
                        "at evaluations and in the summary")
    p.add_argument("--noise-fused", action="store_true",
                   help="with --noise-scale's per-example monitor (one process, no accumulation): the sequence linear "
                        "layers' backward computes the per-example weight gradients instead of autograd's weight "
                        "gradient (cheaper norms; gradients equal up to float rounding); docs/noise.md")
    ddp = p.add_argument_group("distributed (DDP or FSDP; or launch with `torchrun --nproc-per-node N -m batchpilot train ...`)")
    ddp.add_argument("--nproc", type=int, default=None, metavar="N",
                     help="run on N local ranks through torchrun (torch.distributed.run; gloo on CPU); --batch stays "
                          "the global batch, split as micro-batch x accumulation x N")
    ddp.add_argument("--max-restarts", type=int, default=0, metavar="R",
                     help="with --nproc: restart after a lost rank up to R times, resuming from --out's latest checkpoint")
    ddp.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm: BatchNorm statistics over all ranks")
    ddp.add_argument("--strategy", choices=("ddp", "fsdp"), default=None,
                     help="ddp: replicated weights, all-reduced gradients; fsdp: FSDP2 fully_shard (parameters, "
                          "gradients and optimizer state sharded over the ranks; needs >= 2 ranks) (default: ddp, "
                          "or fsdp when --plan was made with --strategy fsdp and this run has >= 2 ranks)")
    ddp.add_argument("--reshard-after-forward", action=argparse.BooleanOptionalAction, default=True,
                     help="with --strategy fsdp: free each unit's gathered parameters after its forward and gather "
                          "them again for the backward (default); --no-reshard-after-forward keeps them until then")
    p.add_argument("--plan", default=None, metavar="PLAN_JSON",
                   help="run a plan.json from `batchpilot plan` (workload, batch split, LR, warmup, threads; explicit "
                        "flags win; default: none)")
    p.add_argument("--trust-plan-workload", action="store_true",
                   help="with --plan: run the plan's own workload code (file.py:fn / pkg.module:fn) without naming it "
                        "with --workload; off by default, because only code named on the command line runs")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace, base_batch: int, regime: FinetuneRegime | None = None,
                     world_size: int = 1) -> TrainConfig:
    """The :class:`TrainConfig` the flags describe (a fine-tuning regime fills in batch and LR not given)."""
    from batchpilot.throughput.amp import parse_amp

    batch = args.batch if args.batch is not None else (regime.batch if regime else base_batch)
    lr = args.lr if args.lr is not None or regime is None or args.lr_rule is not None else regime.lr
    return TrainConfig(
        global_batch=batch,
        micro_batch_per_rank=args.micro_batch, lr=lr, lr_rule=args.lr_rule,
        warmup_steps=args.warmup_steps, schedule=args.schedule, steps=args.steps, epochs=args.epochs,
        grad_clip=args.grad_clip, ema_decay=args.ema, seed=args.seed, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, target=args.target, stop_at_target=args.stop_at_target,
        dtype=args.dtype, optimizer=args.optimizer, batch_schedule=args.batch_schedule, adaptive=args.adaptive,
        max_batch=args.max_batch, min_batch=args.min_batch,
        adaptive_estimator=_adaptive_option(args, "adaptive_estimator"),
        adaptive_throughput=_adaptive_option(args, "adaptive_throughput"),
        adaptive_noise_window=_adaptive_option(args, "adaptive_noise_window"),
        init_from=args.init_from, world_size=world_size,
        sync_batchnorm=getattr(args, "sync_bn", False), strategy=getattr(args, "strategy", None) or "ddp",
        reshard_after_forward=getattr(args, "reshard_after_forward", True),
        amp=parse_amp(getattr(args, "amp", None)),
    )


def run(args: argparse.Namespace) -> int:
    from batchpilot.train.distributed import init_distributed, shutdown_distributed, torchrun_env

    _check_paths(args)
    env = torchrun_env()
    _claim_out_dir(args, env)
    if args.nproc is not None and not env.launched:
        return _launch(args)
    if args.nproc is not None and args.nproc != env.world_size:
        raise BatchpilotError(f"--nproc {args.nproc} given inside a torchrun launch of {env.world_size} ranks")
    env = init_distributed("cpu")
    try:
        return _run(args, env)
    finally:
        shutdown_distributed()


def _check_paths(args: argparse.Namespace) -> None:
    """Paths and flag combinations, before any workload is built or process launched."""
    from batchpilot.cli.outputs import check_in_file, check_out_dir

    _check_log(args)
    if args.workload is not None:
        workload_name(args)  # an empty --workload is an error, not the default
    if args.resume and not args.out:
        raise BatchpilotError("--resume needs --out DIR (where the checkpoint is)")
    if args.finetune and args.init_from is None:
        raise BatchpilotError("--finetune needs --init-from PATH (the pretrained weights to start from)")
    if getattr(args, "noise_fused", False) and not args.noise_scale:
        raise BatchpilotError("--noise-fused needs --noise-scale (it is a mode of the per-example noise monitor)")
    if getattr(args, "noise_fused", False) and args.nproc is not None and args.nproc > 1:
        raise BatchpilotError(f"--noise-fused is a mode of the per-example monitor, which runs on one process; "
                              f"--nproc {args.nproc} measures the noise scale from the ranks: drop --noise-fused")
    if not args.adaptive:
        given = [f"--{name.replace('_', '-')}" for name in ADAPTIVE_DEFAULTS if getattr(args, name, None) is not None]
        if given:
            raise BatchpilotError(f"{', '.join(given)} applies to --adaptive only (add --adaptive, or drop it)")
    if args.max_restarts < 0:
        raise BatchpilotError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if args.max_restarts and args.nproc is None:
        raise BatchpilotError(f"--max-restarts {args.max_restarts} applies with --nproc N only (the launcher restarts "
                              f"lost ranks); add --nproc N")
    if args.checkpoint_every is not None and not args.out:
        raise BatchpilotError(f"--checkpoint-every {args.checkpoint_every} needs --out DIR (where checkpoints go)")
    out = check_out_dir(args.out)
    if out is not None:  # a directory where the run writes these files fails mid-run with a traceback
        from batchpilot.train.checkpoint import CHECKPOINT_NAME

        for name in (CHECKPOINT_NAME, "metrics.jsonl"):  # (summary.json has its fallback file)
            if (out / name).is_dir():
                raise BatchpilotError(f"--out {args.out!r} holds a directory named {name!r}, where the run writes "
                                      f"that file; move it away or choose another --out")
    if args.init_from is not None:
        check_in_file(args.init_from, "--init-from")
    if args.plan is not None:
        check_in_file(args.plan, "--plan")


RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "summary.json")
"""What a run writes in ``--out``: their presence means the directory already holds a run."""


def _claim_out_dir(args: argparse.Namespace, env) -> None:
    """An ``--out`` that already holds a run is not replaced behind the user's back: refused unless
    ``--resume`` (continue it) or ``--overwrite`` (its files are removed now, so no stale checkpoint or
    summary of the old run stays beside the new one). Checked once: by the launcher or a single process,
    and by rank 0 of a torchrun launch's first attempt (the only writer; a restarted attempt resumes its
    own run)."""
    if not args.out or args.resume or env.rank != 0 or env.restart_count:
        return
    from batchpilot.train.checkpoint import CHECKPOINT_NAME

    out = Path(args.out)
    names = (CHECKPOINT_NAME,) + tuple(n for n in RUN_FILES if n != CHECKPOINT_NAME)
    found = [n for n in names if (out / n).is_file()]
    if not found:
        return
    if not args.overwrite:
        raise BatchpilotError(f"--out {args.out!r} already holds a run ({', '.join(found)}): add --resume to continue "
                              f"it, --overwrite to replace it, or choose another --out")
    for name in found:
        (out / name).unlink()


def _launch(args: argparse.Namespace) -> int:
    """``--nproc N``: check the flags here, then run this command on N ranks with torchrun."""
    import copy

    from batchpilot.train.distributed import launch, strip_launcher_args

    if args.nproc < 1:
        raise BatchpilotError(f"--nproc must be >= 1, got {args.nproc}")
    if args.max_restarts < 0:
        raise BatchpilotError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if args.max_restarts and not args.out:
        raise BatchpilotError("--max-restarts needs --out DIR (the checkpoint a restarted run resumes from)")
    # bad flags and plans fail here, once, rather than on every rank
    checked = copy.copy(args)
    if checked.plan:
        import torch

        from batchpilot.cli.plan_cmd import apply_plan_to_train_args

        threads = torch.get_num_threads()
        apply_plan_to_train_args(checked)  # a plan whose batch does not divide over --nproc ranks fails here
        torch.set_num_threads(threads)
    workload = load_workload(checked, "train")
    if not checked.finetune:
        config_from_args(checked, workload.base_batch, world_size=args.nproc)
    return launch(args.nproc, strip_launcher_args(args.raw_argv), max_restarts=args.max_restarts)


def _run(args: argparse.Namespace, env) -> int:
    plan = None
    if args.threads is not None:
        import torch

        if isinstance(args.threads, bool) or args.threads < 1:
            raise BatchpilotError(f"--threads must be a positive integer, got {args.threads!r}")
        torch.set_num_threads(args.threads)
    if args.plan:
        from batchpilot.cli.plan_cmd import apply_plan_to_train_args

        plan = apply_plan_to_train_args(args)
    workload = load_workload(args, "train")
    regime = None
    if args.finetune:
        from batchpilot.optim import with_optimizer

        w = with_optimizer(workload, args.optimizer)
        regime = finetune_regime(w.base_batch, w.base_lr, w.optimizer_family(), num_train=w.num_train, batch=args.batch)
    config = config_from_args(args, workload.base_batch, regime, world_size=env.world_size)
    noise = None
    if getattr(args, "noise_fused", False) and (env.world_size > 1 or config.accumulation_steps > 1
                                                or config.variable_batch):
        why = (f"{env.world_size} ranks" if env.world_size > 1 else
               f"accumulation ({config.accumulation_steps} micro-batches of {config.micro_per_rank})"
               if config.accumulation_steps > 1 else "a batch that changes during the run")
        raise BatchpilotError(f"--noise-fused needs the per-example monitor (one process, no accumulation, a fixed "
                              f"batch); this run has {why}, so --noise-scale measures from the micro-batches: drop "
                              f"--noise-fused")
    if args.noise_scale and (env.world_size > 1 or config.accumulation_steps > 1 or config.variable_batch):
        from batchpilot.noise.microbatch import GradientNoiseScale  # two batch sizes for free (docs/noise.md)

        noise = GradientNoiseScale()
    elif args.noise_scale:  # one process, no accumulation: per-example gradient norms (docs/noise.md)
        from batchpilot.noise.per_example import PerExampleNoiseScale

        noise = PerExampleNoiseScale(fused=getattr(args, "noise_fused", False))
    resume = args.resume or bool(env.restart_count and args.out)  # a torchrun restart resumes its run
    trainer = Trainer(workload, config, out_dir=args.out, resume=resume, progress=env.is_main, noise=noise)
    if env.is_main:  # after the trainer's own checks (a bad batch fails with its one line, nothing else)
        doctor_warnings(config, workload, plan=plan, finetune=args.finetune)
    logger = _step_logger(args, env, workload, trainer)
    try:
        result = trainer.run()
    finally:
        if logger is not None:
            logger.close()
    code = {"diverged": EXIT_DIVERGED, "interrupted": EXIT_INTERRUPTED}.get(result.status, 0)
    if not env.is_main:  # rank 0 alone prints and writes
        return code
    summary = result.to_dict()
    if regime is not None:
        summary["finetune"] = regime.to_dict()
    import torch

    summary["threads"] = torch.get_num_threads()
    if config.world_size > 1:
        summary["strategy"] = config.strategy
        if config.strategy == "fsdp":
            summary["reshard_after_forward"] = config.reshard_after_forward
    if plan is not None:
        summary["plan_check"] = plan_check(plan, result)
    unit = unit_name(workload)
    if noise is not None:
        import math

        summary["noise_scale"] = {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                                  for k, v in noise.estimate().to_dict().items()}
        summary["noise_scale"]["source"] = "ranks" if env.world_size > 1 else \
            summary["noise_scale"].get("method", "micro-batches")
        summary["noise_scale"]["unit"] = unit
    failed = None
    if args.out:
        import json
        from pathlib import Path

        from batchpilot.cli.common import _clean
        from batchpilot.cli.outputs import save_or_fallback

        path = Path(args.out) / "summary.json"
        text = json.dumps(_clean(summary), indent=2, allow_nan=False) + "\n"
        failed = save_or_fallback(lambda: atomic_write_text(path, text), _clean(summary), verb="train",
                                  what=str(path), name="summary.json")
    if args.json:
        print_json(summary)
    else:
        render_summary(result)
        if regime is not None:
            render_regime(regime)
        if plan is not None:
            print(plan_check_line(summary["plan_check"]))
        if noise is not None:
            from rich.console import Console

            n = summary["noise_scale"]
            fmt = lambda v: "n/a" if v is None else f"{v:,.0f}"  # noqa: E731
            source = {"ranks": f"the {config_strategy(args).upper()} ranks", "per-example": "per-example gradient norms",
                      "per-example+micro-batches": "per-example gradient norms and the micro-batches"}.get(n["source"])
            left_out = (f"; leaves out {', '.join(n['excluded'])}: {100 * n['excluded_fraction']:.0f}% of the "
                        "parameters, see docs/noise.md") if n.get("excluded") else ""
            Console().print(f"gradient noise scale B_simple ≈ {fmt(n['b_simple'])} {unit} (80% interval "
                            f"{fmt(n['b_simple_low'])}–{fmt(n['b_simple_high'])} {unit}; {n['n_updates']} steps, from "
                            f"{source or 'the ' + str(n['source'])}{left_out})", highlight=False)
    if result.status == "interrupted":  # one line on stderr: where the run stopped and how to go on
        import sys

        how = f"; rerun with --resume to continue from {args.out}" if args.out else " (no --out: nothing was saved)"
        print(f"batchpilot train: interrupted after step {result.steps}{how}", file=sys.stderr)
    if failed:
        from batchpilot.cli.outputs import report_write_failure

        report_write_failure("train", failed)
        return code or 2
    return code


def config_strategy(args: argparse.Namespace) -> str:
    """``ddp`` or ``fsdp``: how the ranks share the model."""
    return getattr(args, "strategy", None) or "ddp"


def plan_check(plan: dict, result: TrainResult) -> dict:
    """The plan's predictions beside what this run measured (``None`` where either is missing)."""
    def ratio(measured, predicted):
        return measured / predicted if measured is not None and predicted else None

    same = result.global_batch == plan.get("global_batch")
    pred_steps = plan.get("predicted_steps_to_target") if same else None
    pred_time = plan.get("predicted_time_to_target_s") if same else None
    return {"same_batch_as_plan": same, "threads_planned": plan.get("threads"),
            "predicted_steps_to_target": pred_steps, "measured_steps_to_target": result.steps_to_target,
            "steps_ratio": ratio(result.steps_to_target, pred_steps),
            "predicted_time_to_target_s": pred_time, "measured_time_to_target_s": result.time_to_target_s,
            "time_ratio": ratio(result.time_to_target_s, pred_time),
            "predicted_samples_per_s": plan.get("samples_per_s") if same else None,
            "measured_samples_per_s": result.samples_per_s}


def plan_check_line(check: dict) -> str:
    """One line: predicted vs measured steps and time to the target."""
    if not check["same_batch_as_plan"]:
        return "plan check: this run's batch differs from the plan's, so its predictions do not apply"
    def fmt(v, unit=""):
        return "not reached" if v is None else (f"{v:,.1f}{unit}" if isinstance(v, float) else f"{v:,}{unit}")
    parts = [f"steps to target: predicted {fmt(check['predicted_steps_to_target'])}, measured "
             f"{fmt(check['measured_steps_to_target'])}",
             f"time: predicted {fmt(check['predicted_time_to_target_s'], ' s')}, measured "
             f"{fmt(check['measured_time_to_target_s'], ' s')}"]
    threads = f" (threads {check['threads_planned']}, as planned)" if check.get("threads_planned") else ""
    return "plan check: " + "; ".join(parts) + threads


def unit_name(workload) -> str:
    """What the workload's loss counts: ``tokens`` for language models, else ``samples``."""
    from batchpilot.workloads import count_tokens

    return "tokens" if workload.count_units is count_tokens else "samples"


def doctor_warnings(config: TrainConfig, workload, *, plan: dict | None = None, finetune: bool = False) -> list:
    """Run the doctor's rules on this run's own configuration; print warnings and errors on stderr.

    The run goes on whatever the doctor finds (it is advice, not a gate). Returns the findings printed.
    """
    import sys

    import torch

    from batchpilot.doctor import diagnose, parse_config
    from batchpilot.norm import normalization_of
    from batchpilot.optim import with_optimizer

    try:
        w = with_optimizer(workload, config.optimizer)
        lr, rule = config.resolve_lr(w)
        with torch.random.fork_rng(devices=[]):  # building the model must not move the caller's RNG
            norms = normalization_of(w.make_model())
        fields = {
            "global_batch": config.global_batch, "micro_batch_per_rank": config.micro_per_rank,
            "accumulation_steps": config.accumulation_steps, "world_size": config.world_size,
            "lr": lr, "base_batch": w.base_batch, "base_lr": float(w.base_lr), "warmup_steps": config.warmup_steps,
            "optimizer": w.optimizer_family(), "scheduler_step": "per_optimizer_step", "zero_grad": "per_optimizer_step",
            "loss_scaled_by_accumulation": True, "normalization": list(norms), "sync_bn": config.sync_batchnorm,
            "parallel": config.strategy if config.world_size > 1 else "none", "dataset_size": w.num_train, "finetune": finetune,
        }
        if rule != "explicit":
            fields["lr_rule"] = rule
        if config.ema_decay is not None:
            fields.update(ema_step="per_optimizer_step", ema_decay=config.ema_decay)
        if plan is not None:
            fields["batch_source"] = "plan"
            for key in ("noise_scale", "max_micro_batch", "base_lr", "base_batch"):  # the plan's checked base point
                if plan.get(key) is not None:
                    fields[key] = plan[key]
        # BP401 ("no validation run recorded") is moot here: this run is that validation
        findings = [f for f in diagnose(parse_config(fields, kind="config"))
                    if f.severity in ("error", "warning") and f.code != "BP401"]
    except BatchpilotError:  # a value outside the doctor's schema: the trainer's own checks already passed
        return []
    for f in findings:
        print(f"batchpilot train: doctor {f.severity} {f.code}: {' '.join(f.message.split())} (fix: "
              f"{' '.join(f.fix.split())})", file=sys.stderr)
    return findings


def render_summary(result: TrainResult) -> None:
    """A rich table of the run's summary."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"batchpilot train: {result.workload} ({result.status})", show_header=False)
    d = result.to_dict()
    for key in ("global_batch", "micro_batch_per_rank", "accumulation_steps", "world_size", "lr", "lr_rule",
                "warmup_steps", "steps", "final_train_loss", "val_metric", "samples_per_s", "wall_s",
                "target", "steps_to_target", "time_to_target_s", "optimizer", "batch_mode"):
        value = d[key]
        table.add_row(key if key != "val_metric" else result.metric_name,
                      "n/a" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value))
    if result.batch_mode != "fixed":
        table.add_row("batch_sizes (step, batch)", ", ".join(f"({s}, {b})" for s, b in result.batch_sizes[:12])
                      + (" ..." if len(result.batch_sizes) > 12 else ""))
    Console(highlight=False).print(table)


def render_regime(regime: FinetuneRegime) -> None:
    """The fine-tuning regime's reasoning, labelled as a hypothesis."""
    from rich.console import Console

    console = Console()
    console.print(f"[bold]fine-tuning regime (hypothesis, confirm with a sweep):[/bold] batch {regime.batch}, lr {regime.lr:.3g}")
    for line in regime.reasoning:
        console.print(f"  - {line}")


def _check_log(args: argparse.Namespace) -> None:
    """``--log`` kinds, their directory, and the tensorboard package, before anything runs."""
    from batchpilot.train.metrics_log import parse_log_kinds, require_tensorboard

    kinds = parse_log_kinds(getattr(args, "log", None))
    if getattr(args, "log", None) and not kinds:
        raise BatchpilotError(f"--log must be one of tensorboard, csv, jsonl (several allowed), got {args.log[-1]!r}")
    if not kinds:
        if getattr(args, "log_dir", None) is not None:
            raise BatchpilotError("--log-dir needs --log tensorboard|csv|jsonl")
        return
    if getattr(args, "log_dir", None) is None and not args.out:
        raise BatchpilotError("--log needs a directory to write to: --out DIR or --log-dir DIR")
    if args.log_dir is not None:
        from batchpilot.cli.outputs import check_out_dir

        check_out_dir(args.log_dir, "--log-dir")
    if "tensorboard" in kinds:
        require_tensorboard()


def _step_logger(args: argparse.Namespace, env, workload, trainer):
    """``--log``: a :class:`~batchpilot.train.metrics_log.StepLogger` on rank 0, installed as the trainer's
    ``on_step`` hook (the hook it had runs after it); ``None`` without ``--log`` or on other ranks."""
    from batchpilot.train.loop import reported_metrics
    from batchpilot.train.metrics_log import StepLogger, make_sinks, parse_log_kinds, trainer_noise

    kinds = parse_log_kinds(getattr(args, "log", None))
    if not kinds or not env.is_main:
        return None
    sinks = make_sinks(kinds, args.log_dir or args.out, metric_columns=reported_metrics(workload))
    logger = StepLogger(sinks, noise=trainer_noise(trainer), then=trainer.on_step)
    trainer.on_step = logger
    return logger
