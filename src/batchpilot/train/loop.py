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

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from batchpilot.train.drivers import make_batch_driver
from batchpilot.workloads.data import EpochBatchSampler, fetch, split_micro
from batchpilot.errors import BatchpilotError
from batchpilot.throughput.amp import amp_policy
from batchpilot.files import atomic_write_text
from batchpilot.optim import with_optimizer
from batchpilot.train.regime import load_pretrained
from batchpilot.scaling.lr_rules import default_lr_rule
from batchpilot.scaling.lr_schedules import make_scheduler
from batchpilot.train.accumulation import AfterMicro, accumulate_gradients
from batchpilot.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from batchpilot.train.config import TrainConfig
from batchpilot.train.distributed import check_world_size, maybe_inject_fault, torchrun_env
from batchpilot.train.result import TrainResult
from batchpilot.workloads import Target, Workload

EVAL_BATCH = 1024
StepCallback = Callable[[dict], None]


def _to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


@torch.no_grad()
def evaluate(model: nn.Module, workload: Workload, dtype: torch.dtype = torch.float32, *, split: str = "val") -> dict[str, float]:
    """Mean loss and metric of ``model`` on a split, in eval mode; the training mode is restored after."""
    data = workload.val_data if split == "val" else workload.train_data
    was_training = model.training
    model.eval()
    loss_sum = metric_sum = 0.0
    units = 0
    n = len(data)  # type: ignore[arg-type]
    for start in range(0, n, EVAL_BATCH):
        x, y = fetch(data, torch.arange(start, min(n, start + EVAL_BATCH)))
        out = model(_to_dtype(x, dtype))
        loss_sum += float(workload.loss_sum(out, y))
        if workload.metric_sum is not None:
            metric_sum += float(workload.metric_sum(out, y))
        units += workload.count_units(y)
    model.train(was_training)
    loss = loss_sum / units
    metric = metric_sum / units if workload.metric_sum is not None else loss
    return {f"{split}_loss": loss, f"{split}_metric": metric}


@dataclass
class _Counters:
    step: int = 0
    samples: int = 0
    train_wall_s: float = 0.0
    initial_loss: float = float("nan")
    last_loss: float = float("nan")
    steps_to_target: int | None = None
    samples_to_target: int | None = None
    time_to_target_s: float | None = None


class Trainer:
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

    # -- one step -------------------------------------------------------------------------
    def _step(self, model, optimizer, scheduler, ema, sampler) -> tuple[float, dict]:
        """One optimizer step; returns the mean loss and the step's record fields (LR used, samples ...).

        Until the optimizer step the phase is ``accumulate`` (an interrupt rolls back); from the optimizer
        step until the step is counted by the caller it is ``apply`` (SIGINT is held back).
        """
        cfg, w = self.config, self.workload
        self._phase = "accumulate"
        batch, micro_batch, info = cfg.global_batch, cfg.micro_per_rank, {}
        if self.batching is not None:
            plan = self.batching.plan(self._counters.step, self._counters.samples)
            batch, micro_batch, info = plan.batch, plan.micro_batch, dict(plan.info)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * plan.lr_scale
        lr = optimizer.param_groups[0]["lr"]
        idx = sampler.next_batch(batch)
        parts = split_micro(idx, micro_batch) if self.dist is None else self.dist.micro_batches(idx, micro_batch)
        micro = []
        for part in parts:
            x, y = fetch(w.train_data, part)
            micro.append((_to_dtype(x, self.dtype), y))
        if self.batching is not None:
            self.batching.before_accumulate()  # (the adaptive controller times the steps)
        if self.dist is None:
            loss = accumulate_gradients(model, micro, w.loss_sum, w.count_units, after_micro=self.after_micro,
                                        autocast=self._autocast, scaler=self._scaler)
        else:
            loss = self._ddp_accumulate(micro)
        self._phase = "apply"
        if self._scaler is not None:  # fp16: gradients back to their true scale before clipping (AMP recipe)
            self._scaler.unscale_(optimizer)
        if cfg.grad_clip is not None and self.fsdp:
            from batchpilot.train.fsdp import clip_grad_norm

            clip_grad_norm(model, cfg.grad_clip)  # the norm of the full gradient, from the shards
        elif cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if self._scaler is not None:  # skips the step when a gradient overflowed, then adapts the scale
            self._scaler.step(optimizer)
            self._scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        optimizer.zero_grad(set_to_none=True)
        self._counters.samples += len(idx)
        if self.batching is not None:
            self.batching.after_step(self._counters.step + 1, len(idx))
        return loss, {"lr": lr, "batch": len(idx), **info}

    def _ddp_accumulate(self, micro) -> float:
        """This rank's share under DDP: loss x world / global units, so DDP's average is the global mean.
        Under FSDP: loss / global units, since the reduce-scatter sums (:mod:`batchpilot.train.fsdp`)."""
        w, d = self.workload, self.dist
        local_units = sum(w.count_units(y) for _, y in micro)
        total = round(d.all_reduce_sum([local_units])[0])
        if self.rank_noise is not None:
            self.rank_noise.begin_step(local_units)
        no_sync = None
        if self.fsdp:
            from batchpilot.train.fsdp import no_gradient_sync

            no_sync = lambda: no_gradient_sync(self._ddp)  # noqa: E731
        loss = accumulate_gradients(self._ddp, micro, w.loss_sum, w.count_units, total_units=total,
                                    loss_scale=1.0 if self.fsdp else float(d.world_size),
                                    after_micro=self.after_micro, no_sync=no_sync,
                                    autocast=self._autocast, scaler=self._scaler)
        if self.rank_noise is not None:
            self.rank_noise.end_step()
        return d.all_reduce_sum([loss])[0]

    def _target_stop(self) -> bool:
        return self.config.stop_at_target and self._counters.steps_to_target is not None

    def _finished(self) -> bool:
        if self._target_stop():  # also on resuming a run that already reached its target
            return True
        if self.batching is not None:
            return self.batching.done(self._counters.samples)
        return self._counters.step >= self.total_steps

    def _diverged(self, loss: float) -> bool:
        c = self._counters
        if not math.isfinite(loss):
            return True
        return c.step > 1 and loss > self.config.diverge_factor * max(c.initial_loss, 1e-8)

    # -- checkpoints ----------------------------------------------------------------------
    def _state(self, model, optimizer, scheduler, ema, sampler) -> dict:
        c = self._counters
        if self.fsdp:  # a collective: the full state gathered onto rank 0's CPU
            from batchpilot.train.fsdp import full_state

            model_state, optim_state = full_state(model, optimizer)
        else:
            model_state, optim_state = model.state_dict(), optimizer.state_dict()
        return {
            "config": self.config.to_dict(),
            "workload": self.workload.name,
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "sampler": sampler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "counters": {k: getattr(c, k) for k in c.__dataclass_fields__},
            "batching": self.batching.state_dict() if self.batching is not None else None,
            "noise": _noise_state(self.noise),
            "pending_record": dict(self._pending) if self._pending is not None else None,
            **({"rng_cpu_ranks": self.dist.gather(torch.get_rng_state())} if self.dist is not None else {}),
        }

    def _save(self, ckpt: Path, *objects) -> None:
        state = self._state(*objects)  # every rank: the RNG states are gathered
        if self.is_main:
            save_checkpoint(ckpt, state)

    def _restore(self, state: dict, ckpt: Path, model, optimizer, scheduler, ema, sampler) -> None:
        """Load a checkpoint (checked by :func:`load_checkpoint`); anything that does not fit this run is a
        one-line :class:`BatchpilotError`."""
        where = f"checkpoint {str(ckpt)!r}"
        if not isinstance(state["config"], dict) or not isinstance(state["counters"], dict):
            raise BatchpilotError(f"{where} is not a batchpilot checkpoint (config and counters must be dicts)")
        saved = {k: v for k, v in state["config"].items() if k not in ("steps", "epochs", "checkpoint_every", "eval_every")}
        current = {k: v for k, v in self.config.to_dict().items() if k in saved}
        if saved != current or state["workload"] != self.workload.name:
            diff = sorted(k for k in saved if saved[k] != current.get(k))
            raise BatchpilotError(f"checkpoint in {self.out_dir} was made with a different run (differs in: {', '.join(diff) or 'workload'})")
        if self.fsdp:
            self._restore_fsdp(state, where, model, optimizer)
        else:
            load_weights(model, state["model"], where)
        try:
            if not self.fsdp:
                optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if ema is not None and state.get("ema") is not None:
                load_weights(ema, state["ema"], f"{where} (EMA)")
            sampler.load_state_dict(state["sampler"])
            torch.set_rng_state(state["rng_cpu"])
            ranks = state.get("rng_cpu_ranks")
            if self.dist is not None and ranks is not None and len(ranks) == self.dist.world_size:
                torch.set_rng_state(ranks[self.dist.rank])
            self._counters = _Counters(**state["counters"])
            if self.batching is not None:
                self.batching.load_state_dict(state["batching"])
            if state.get("noise") is not None and hasattr(self.noise, "load_state_dict"):
                self.noise.load_state_dict(state["noise"])
            pending = state.get("pending_record")
            if pending is not None and not (isinstance(pending, dict) and pending.get("step") == self._counters.step):
                raise ValueError(f"its pending record is not that of step {self._counters.step}")
            self._pending = dict(pending) if pending is not None else None
        except BatchpilotError:
            raise
        except Exception as exc:  # a hand-edited or foreign checkpoint: wrong types, keys, sizes
            raise BatchpilotError(f"{where} does not fit this run ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:200]}); move it away to start fresh") from None

    def _restore_fsdp(self, state: dict, where: str, model, optimizer) -> None:
        """The full model and optimizer state of an FSDP checkpoint into this rank's shards."""
        from batchpilot.train.fsdp import load_full_state

        weights = state["model"]
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise BatchpilotError(f"{where}: no model state_dict (expected tensors by parameter name)")
        try:
            load_full_state(model, optimizer, weights, state["optimizer"])
        except Exception as exc:  # other keys or shapes: a checkpoint of another model
            raise BatchpilotError(f"{where} does not fit this FSDP run ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:200]}); move it away to start fresh") from None

    def _truncate_metrics(self, step: int) -> None:
        """Keep the records of steps 1..``step`` (a record cut off by a crash, or of a later step, goes)."""
        path = self.out_dir / "metrics.jsonl"  # type: ignore[operator]
        if not path.exists():
            return
        kept = [ln for ln in path.read_text(errors="replace").splitlines() if _record_step(ln) is not None
                and _record_step(ln) <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))

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

    def _finish_step(self, record: dict, objects, metrics, bar, bar_done, save, stop_after) -> str | None:
        """Everything after a counted step: divergence, evaluation, the record, hooks, the periodic
        checkpoint. Returns the run's final status if the run ends here, else ``None``."""
        cfg, c = self.config, self._counters
        model, ema = objects[0], objects[3]
        if self._diverged(record["loss"]):
            _write(metrics, record)
            self._pending = None
            return "diverged"
        if (cfg.eval_every and c.step % cfg.eval_every == 0) or self._finished():
            record.update(self._eval(model, ema))
            self._check_target(record)
            if self.rank_noise is not None:
                self.rank_noise.flush()
            if self.noise is not None and self.noise.n_updates:
                b = self.noise.estimate().b_simple
                record.setdefault("b_noise", b if math.isfinite(b) else None)
        _write(metrics, record)
        self._pending = None
        if self.on_step is not None:
            self.on_step(record)
        if bar is not None:
            bar.update(bar.task_ids[0], completed=bar_done(), description=f"{self.workload.name} loss {record['loss']:.4f}")
        if cfg.checkpoint_every and c.step % cfg.checkpoint_every == 0:
            save()
        if self._target_stop():
            return "target_reached"
        if stop_after is not None and c.step >= stop_after and not self._finished():
            return "stopped"
        return None

    # -- interrupts -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _hold_sigint(self):
        """While the run lasts, SIGINT raises ``KeyboardInterrupt`` as usual, except while a step is applied
        or the last checkpoint written: then it is held back until that is done. Only installed in the
        main thread, over Python's default handler (a handler of the caller's own is left alone)."""
        self._sigint_held = False
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield
            return

        def on_sigint(signum, frame):
            if self._phase in ("apply", "saving"):
                self._sigint_held = True
                return
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _snapshot(self, model, optimizer, sampler) -> dict:
        """What a step changes before its optimizer step (the roll-back of an interrupted step)."""
        return {
            "sampler": sampler.state_dict(), "rng_cpu": torch.get_rng_state(),
            "lr": [group["lr"] for group in optimizer.param_groups],
            "buffers": [b.detach().clone() for b in model.buffers()],
            "batching": self.batching.state_dict() if self.batching is not None else None,
            "noise": _noise_state(self.noise),
        }

    def _rollback(self, snap: dict, model, optimizer, sampler) -> None:
        """Undo a step interrupted before its optimizer step: the state is that of the last completed step."""
        sampler.load_state_dict(snap["sampler"])
        torch.set_rng_state(snap["rng_cpu"])
        for group, lr in zip(optimizer.param_groups, snap["lr"]):
            group["lr"] = lr
        with torch.no_grad():
            for buf, saved in zip(model.buffers(), snap["buffers"]):
                buf.copy_(saved)
        if self.batching is not None:
            self.batching.load_state_dict(snap["batching"])
        if snap["noise"] is not None:
            self.noise.load_state_dict(snap["noise"])
        optimizer.zero_grad(set_to_none=True)

    def _eval(self, model, ema) -> dict[str, float]:
        out = evaluate(ema.module if ema is not None else model, self.workload, self.dtype)
        return {"val_loss": out["val_loss"], self.workload.metric_name: out["val_metric"]}

    def _check_target(self, record: dict) -> None:
        c, t = self._counters, self.target
        if t is None or c.steps_to_target is not None or t.metric not in record:
            return
        if t.reached(record[t.metric]):
            c.steps_to_target, c.samples_to_target, c.time_to_target_s = c.step, c.samples, c.train_wall_s

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


def _noise_state(noise) -> dict | None:
    """A noise monitor's state for a checkpoint or a roll-back; ``None`` for a monitor that has no
    ``state_dict`` (it then starts afresh on resume)."""
    state_dict = getattr(noise, "state_dict", None)
    return state_dict() if callable(state_dict) else None


def reported_metrics(workload: Workload) -> tuple[str, ...]:
    """The metrics a target can name: those in every evaluation record of ``workload``."""
    return tuple(dict.fromkeys((workload.metric_name, "val_loss", "loss")))


def check_target_metric(target: Target | None, workload: Workload) -> None:
    """Refuse a target on a metric the workload never reports (it could never be reached)."""
    if target is None:
        return
    known = reported_metrics(workload)
    if target.metric not in known:
        raise BatchpilotError(f"target {str(target)!r} names metric {target.metric!r}, which workload "
                              f"{workload.name!r} does not report; expected one of: {', '.join(known)}")


def load_weights(model: nn.Module, state: object, what: str) -> None:
    """``model.load_state_dict(state)``, with a one-line :class:`BatchpilotError` naming ``what`` when the
    weights are of another model (missing or unexpected keys, other shapes)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BatchpilotError(f"{what}: no model state_dict (expected tensors by parameter name)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {list(state[k].shape)} in the file, {list(own[k].shape)} in the model"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            problems.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    if problems:
        raise BatchpilotError(f"{what}: the weights are of another model than this {type(model).__name__} "
                              f"({'; '.join(problems)})")
    try:
        model.load_state_dict(state)
    except Exception as exc:  # dtype casts that fail and the like
        raise BatchpilotError(f"{what}: cannot be loaded into the model ({' '.join(str(exc).split())[:200]})") from None


def _record_step(line: str) -> int | None:
    """The step of a metrics.jsonl line, or ``None`` for a blank, cut-off or foreign line."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _chain(hooks):
    def after_micro(index: int, units: int) -> None:
        for hook in hooks:
            hook(index, units)
    return after_micro


def _batch_mode(cfg: TrainConfig) -> str:
    return "adaptive" if cfg.adaptive else (f"schedule {cfg.batch_schedule}" if cfg.batch_schedule else "fixed")


def _write(fh, record: dict) -> None:
    if fh is not None:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


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
