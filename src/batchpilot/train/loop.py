"""The reference training loop, in the spirit of nanoGPT: plain, readable, exact.

One optimizer step = one global batch = ``accumulation_steps`` micro-batches. The
scheduler and the EMA advance only on optimizer steps; clipping applies to the
accumulated gradient. The caller's global RNG is restored when the run ends.
With a batch schedule or adaptive batching, a *batch driver* (:mod:`batchpilot.train.batching`)
sets each step's batch, micro-batch and LR; the run is then counted in samples.
With ``world_size > 1`` (a ``torchrun`` launch) the model runs under DDP: each rank takes its exact
share of every global batch, the loss is normalised by the all-reduced unit count, and rank 0 alone
logs and writes checkpoints (:mod:`batchpilot.train.distributed`). With ``strategy="fsdp"`` the model
is sharded with FSDP2 instead (:mod:`batchpilot.train.fsdp`): the same shares and normalisation, the
gradients reduce-scattered as sums, checkpoints gathered to rank 0.
The :class:`Trainer` runs the loop; its parts are mixins in their own modules: one step
(:mod:`batchpilot.train.step`), the checkpoint state (:mod:`batchpilot.train.trainer_state`) and the
interrupts (:mod:`batchpilot.train.interrupts`); :func:`evaluate` is in :mod:`batchpilot.train.evaluation`.

Interrupts: Ctrl-C (``KeyboardInterrupt``) at any point of a run leaves a checkpoint of a
*completed* step, so ``--resume`` ends bit-identical to an uninterrupted run. Each step has three
phases. While the batch is drawn and the micro-batches run forward and backward, an interrupt rolls
the step back (sampler position, RNG, BatchNorm buffers, the LR set for the step, the batch driver
and the noise monitor return to their state before the step). While the optimizer, scheduler and
EMA apply the step, SIGINT is held back until the step is counted. After that, the step is
complete; an interrupt before its metrics record is written leaves that record pending in the
checkpoint, and the resumed run evaluates and writes it first.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from batchpilot.train.drivers import make_batch_driver
from batchpilot.workloads.data import EpochBatchSampler
from batchpilot.errors import BatchpilotError
from batchpilot.throughput.amp import amp_policy
from batchpilot.files import atomic_write_text
from batchpilot.optim import with_optimizer
from batchpilot.train.regime import load_pretrained
from batchpilot.scaling.lr_rules import default_lr_rule
from batchpilot.scaling.lr_schedules import make_scheduler
from batchpilot.train.accumulation import AfterMicro
from batchpilot.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from batchpilot.train.config import TrainConfig
from batchpilot.train.distributed import check_world_size, maybe_inject_fault, torchrun_env
from batchpilot.train.evaluation import (  # noqa: F401 - re-exported: loop.X names stay public
    EVAL_BATCH, check_target_metric, evaluate, reported_metrics)
from batchpilot.train.interrupts import TrainerInterrupts
from batchpilot.train.result import TrainResult
from batchpilot.train.step import TrainerStep
from batchpilot.train.trainer_state import TrainerState, _Counters, load_weights
from batchpilot.workloads import Workload

StepCallback = Callable[[dict], None]


class Trainer(TrainerStep, TrainerState, TrainerInterrupts):
    """Trains ``workload`` under ``config``; writes metrics and checkpoints to ``out_dir`` if given.

    Args:
        workload: what to train.
        config: how to train it.
        out_dir: directory for ``metrics.jsonl`` and ``checkpoint.pt`` (``None``: nothing written).
        resume: continue from ``out_dir/checkpoint.pt`` if it exists.
        progress: show a rich progress bar on stderr.
        after_micro: hook after each micro-batch backward (e.g. a noise monitor); under DDP it sees this
            rank's local gradient until the last micro-batch.
        on_step: hook receiving each step's record.
        noise: a :class:`~batchpilot.noise.microbatch.GradientNoiseScale` to feed: from the ranks under DDP
            (:class:`~batchpilot.noise.ranks.RankNoiseScale`), else from the micro-batches (needs accumulation);
            or a :class:`~batchpilot.noise.per_example.PerExampleNoiseScale` (one process, any accumulation).
    """

    def __init__(
        self,
        workload: Workload,
        config: TrainConfig,
        *,
        out_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool = False,
        after_micro: AfterMicro | None = None,
        on_step: StepCallback | None = None,
        noise=None,
    ) -> None:
        workload = with_optimizer(workload, config.optimizer)
        self.workload, self.config = workload, config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.resume, self.progress = resume, progress
        self.after_micro, self.on_step = after_micro, on_step
        if workload.memory_only:
            raise BatchpilotError(f"workload {workload.name!r} is memory-only (random data): use `batchpilot memory`, not training")
        n = workload.num_train
        if config.global_batch > n:
            raise BatchpilotError(f"batch {config.global_batch} is larger than the training set of {workload.name!r} ({n} samples)")
        if config.checkpoint_every is not None and self.out_dir is None:
            raise BatchpilotError(f"checkpoint every {config.checkpoint_every} steps needs an output directory "
                                  "(--out DIR) to write checkpoint.pt to")
        self.dtype = getattr(torch, config.dtype)
        self._amp = amp_policy(config.amp, "cpu")  # mixed precision (throughput/amp.py); the trainer runs on the CPU
        self._autocast = self._amp.autocast if self._amp is not None else None
        self._scaler = self._amp.make_scaler() if self._amp is not None else None
        self.lr, self.lr_rule = config.resolve_lr(workload)
        self.target = config.resolve_target(workload)
        check_target_metric(self.target, workload)
        self.total_steps = config.total_steps(n)
        batch_rule = config.lr_rule or default_lr_rule(workload.optimizer_family())
        self.batching = make_batch_driver(config, workload, batch_rule)
        self.dist = check_world_size(config.world_size)
        self.fsdp = config.strategy == "fsdp" and self.dist is not None
        self.is_main = self.dist is None or self.dist.is_main
        self.noise, self.rank_noise, self._ddp = noise, None, None
        if noise is not None and self.dist is not None and not getattr(noise, "needs_accumulation", True):
            raise BatchpilotError("the per-example noise scale runs in one process; under DDP the noise scale "
                                  "comes from the ranks (GradientNoiseScale)")
        if noise is not None and self.dist is None:
            if config.accumulation_steps < 2 and not config.variable_batch and getattr(noise, "needs_accumulation", True):
                raise BatchpilotError("the noise scale needs two batch sizes: a micro-batch below the batch "
                                      "(accumulation) or more than one rank")
            noise.attach(lambda: self.model)
        hooks = [h for h in (getattr(self.batching, "after_micro", None), after_micro,
                             noise.after_micro if noise is not None and self.dist is None else None) if h is not None]
        self.after_micro = hooks[0] if len(hooks) == 1 else (_chain(hooks) if hooks else None)
        self.model: nn.Module | None = None
        self.ema: AveragedModel | None = None
        self._phase = "idle"  # "accumulate" | "apply" | "after" | "saving": see the module docstring
        self._sigint_held = False
        self._snap: dict | None = None  # the state before the running step (for a roll-back)
        self._pending: dict | None = None  # the record of a counted step not yet written

    def _target_stop(self) -> bool:
        return self.config.stop_at_target and self._counters.steps_to_target is not None

    def _finished(self) -> bool:
        if self._target_stop():  # also on resuming a run that already reached its target
            return True
        if self.batching is not None:
            return self.batching.done(self._counters.samples)
        return self._counters.step >= self.total_steps

    # -- the run --------------------------------------------------------------------------
    def run(self, *, stop_after: int | None = None) -> TrainResult:
        """Train; ``stop_after`` ends the run early at that step with a checkpoint (for tests)."""
        with torch.random.fork_rng(devices=[]):
            return self._run(stop_after)

    def _run(self, stop_after: int | None) -> TrainResult:
        cfg, w = self.config, self.workload
        self._phase, self._pending, self._sigint_held = "idle", None, False
        torch.manual_seed(cfg.seed)
        model = w.make_model().to(self.dtype)
        if cfg.init_from:
            load_weights(model, load_pretrained(cfg.init_from), f"--init-from weights {cfg.init_from!r}")
        if cfg.sync_batchnorm:
            from batchpilot.train.sync_bn import convert_sync_batchnorm

            convert_sync_batchnorm(model)
        if self.fsdp:  # before the optimizer is built: it must hold the sharded parameters
            from batchpilot.train.fsdp import FsdpConfig, shard_model

            shard_model(model, FsdpConfig(reshard_after_forward=cfg.reshard_after_forward))
        model.train()
        optimizer = w.make_optimizer(model.parameters(), self.lr)
        scheduler = make_scheduler(optimizer, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, total_steps=self.total_steps)
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True) if cfg.ema_decay else None
        sampler = EpochBatchSampler(w.num_train, seed=cfg.seed)
        self._counters = _Counters()
        self.model, self.ema = model, ema
        bind = getattr(self.noise, "bind_model", None)  # a monitor with hooks needs them before the first forward
        if bind is not None and self.dist is None:
            bind(model)
        if self.batching is not None:
            self.batching.bind(lambda: self.model, w, self.dtype, w.optimizer_family())
        ckpt = self.out_dir / CHECKPOINT_NAME if self.out_dir is not None else None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.dist is not None and self.dist.rank > 0:
            torch.manual_seed(cfg.seed + 1_000_003 * self.dist.rank)  # rank r's own dropout stream
        if self.resume and ckpt is not None and ckpt.exists():  # every rank loads the checkpoint
            self._restore(load_checkpoint(ckpt), ckpt, model, optimizer, scheduler, ema, sampler)
            if self.is_main:  # a pending step's record is written again by the loop
                self._truncate_metrics(self._counters.step - (self._pending is not None))
        elif self.out_dir is not None and self.is_main:
            if self.resume:
                print(f"batchpilot train: no checkpoint in {str(self.out_dir)!r} to resume from; starting fresh",
                      file=sys.stderr, flush=True)
            atomic_write_text(self.out_dir / "metrics.jsonl", "")
            if ckpt is not None and ckpt.exists() and torchrun_env().launched:
                ckpt.unlink()  # a restarted attempt of this run must not resume from an older run's checkpoint
        if self.dist is not None:
            self.dist.check_same(self._counters.step, "the step to resume from")
            self._ddp = model if self.fsdp else self.dist.wrap(model)
            if self.noise is not None and self.fsdp:
                from batchpilot.noise.fsdp_ranks import FsdpRankNoiseScale

                self.rank_noise = FsdpRankNoiseScale(model, self.noise)
            elif self.noise is not None:
                from batchpilot.noise.ranks import RankNoiseScale

                self.rank_noise = RankNoiseScale(self._ddp, self.noise)
        return self._loop(model, optimizer, scheduler, ema, sampler, ckpt, stop_after)

    def _loop(self, model, optimizer, scheduler, ema, sampler, ckpt, stop_after) -> TrainResult:
        c = self._counters
        metrics = open(self.out_dir / "metrics.jsonl", "a") if self.out_dir is not None and self.is_main else None
        bar_total, bar_done = (self.total_steps, lambda: c.step) if self.batching is None else \
            (self.batching.budget_samples, lambda: c.samples)
        bar = _progress(self.progress and self.is_main, bar_total, bar_done(), self.workload.name)
        save = (lambda: self._save(ckpt, model, optimizer, scheduler, ema, sampler)) if ckpt else (lambda: None)
        objects = (model, optimizer, scheduler, ema, sampler)
        status: str | None = None
        consistent = True  # whether the objects hold the state of a completed step
        start_step, had_pending = c.step, self._pending is not None
        with self._hold_sigint():
            try:
                if self._pending is not None:  # resumed from an interrupt after a counted step
                    self._phase = "after"
                    status = self._finish_step(dict(self._pending), objects, metrics, bar, bar_done, save, stop_after)
                while status is None and not self._finished():
                    self._snap = self._snapshot(model, optimizer, sampler) if self.dist is None else None
                    t0 = time.perf_counter()
                    loss, info = self._step(model, optimizer, scheduler, ema, sampler)
                    c.train_wall_s += time.perf_counter() - t0
                    c.step += 1
                    if c.step == 1:
                        c.initial_loss = loss
                    c.last_loss = loss
                    record = {"step": c.step, "loss": loss, "lr": info.pop("lr"), "batch": info.pop("batch"),
                              "samples": c.samples, "epoch": sampler.epochs_done, "wall_s": c.train_wall_s, **info}
                    self._pending, self._phase = dict(record), "after"
                    if self._sigint_held:  # Ctrl-C while the step was applied: the step is complete now
                        self._sigint_held = False
                        raise KeyboardInterrupt
                    maybe_inject_fault(c.step)
                    status = self._finish_step(record, objects, metrics, bar, bar_done, save, stop_after)
                    self._phase = "idle"
            except KeyboardInterrupt:
                status = "interrupted"
                if self._phase == "accumulate" and self._snap is not None:
                    self._rollback(self._snap, model, optimizer, sampler)
                elif self._phase in ("accumulate", "apply"):
                    consistent = False  # (DDP, or an exception from inside the optimizer step)
            finally:
                self._snap = None
                if self.rank_noise is not None:
                    self.rank_noise.flush()
                if bar is not None:
                    bar.stop()
                if metrics is not None:
                    metrics.close()
            if status is None:
                status = "target_reached" if self._target_stop() else "completed"
            # a resumed run that took no step (e.g. --resume of a finished run): its checkpoint already holds this
            unchanged = start_step > 0 and c.step == start_step and not had_pending
            if status != "diverged" and consistent and not unchanged and not (status == "interrupted" and self.dist is not None):
                self._phase = "saving"  # Ctrl-C now waits for the checkpoint to be written
                save()  # (an interrupted DDP run keeps its last periodic checkpoint: the peers may be gone)
            self._phase = "idle"
            self._pending = None
            if self._sigint_held and status != "interrupted":
                raise KeyboardInterrupt  # Ctrl-C while the last checkpoint was written: it is written
        return self._result(model, ema, status)

    def _eval(self, model, ema) -> dict[str, float]:
        out = evaluate(ema.module if ema is not None else model, self.workload, self.dtype)
        return {"val_loss": out["val_loss"], self.workload.metric_name: out["val_metric"]}

    def _result(self, model, ema, status: str) -> TrainResult:
        c, cfg, w = self._counters, self.config, self.workload
        final = {} if status == "diverged" else evaluate(ema.module if ema is not None else model, w, self.dtype)
        return TrainResult(
            status=status, workload=w.name, steps=c.step, global_batch=cfg.global_batch,
            micro_batch_per_rank=cfg.micro_per_rank, accumulation_steps=cfg.accumulation_steps,
            world_size=cfg.world_size, lr=self.lr, lr_rule=self.lr_rule, warmup_steps=cfg.warmup_steps,
            schedule=cfg.schedule, final_train_loss=c.last_loss, metric_name=w.metric_name,
            val_metric=final.get("val_metric", float("nan")), val_loss=final.get("val_loss", float("nan")),
            samples=c.samples, samples_per_s=c.samples / c.train_wall_s if c.train_wall_s > 0 else 0.0,
            wall_s=c.train_wall_s, target=str(self.target) if self.target else None,
            steps_to_target=c.steps_to_target, samples_to_target=c.samples_to_target,
            time_to_target_s=c.time_to_target_s, out_dir=str(self.out_dir) if self.out_dir else None,
            optimizer=cfg.optimizer, batch_mode=_batch_mode(cfg),
            batch_sizes=tuple((s, b) for s, b in self.batching.changes) if self.batching is not None
            else ((1, cfg.global_batch),), amp=cfg.amp,
        )


def _chain(hooks):
    def after_micro(index: int, units: int) -> None:
        for hook in hooks:
            hook(index, units)
    return after_micro


def _batch_mode(cfg: TrainConfig) -> str:
    return "adaptive" if cfg.adaptive else (f"schedule {cfg.batch_schedule}" if cfg.batch_schedule else "fixed")


def _progress(enabled: bool, total: int, done: int, name: str):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    bar.add_task(name, total=total, completed=done)
    bar.start()
    return bar


def train(workload: Workload, config: TrainConfig, **kwargs) -> TrainResult:
    """Train ``workload`` under ``config`` (see :class:`Trainer` for the keyword arguments)."""
    return Trainer(workload, config, **kwargs).run()
