"""One optimizer step of the :class:`~batchpilot.train.loop.Trainer`, and what follows a counted step.

:class:`TrainerStep` is a mixin of the Trainer: the step (the batch and LR from the batch driver, the
micro-batches forward and backward, DDP/FSDP normalisation, AMP unscaling, clipping, the optimizer,
scheduler and EMA) and, once the step is counted, divergence, evaluation, the target, the record and
the periodic checkpoint.
"""

from __future__ import annotations

import json
import math

import torch

from batchpilot.train.accumulation import accumulate_gradients
from batchpilot.train.evaluation import _to_dtype
from batchpilot.workloads.data import fetch, split_micro


class TrainerStep:
    """A step of the Trainer (a mixin: it uses the Trainer's configuration, model wrappers, hooks and
    counters, and its ``_eval``, ``_finished`` and ``_target_stop``)."""

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

    def _diverged(self, loss: float) -> bool:
        c = self._counters
        if not math.isfinite(loss):
            return True
        return c.step > 1 and loss > self.config.diverge_factor * max(c.initial_loss, 1e-8)

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

    def _check_target(self, record: dict) -> None:
        c, t = self._counters, self.target
        if t is None or c.steps_to_target is not None or t.metric not in record:
            return
        if t.reached(record[t.metric]):
            c.steps_to_target, c.samples_to_target, c.time_to_target_s = c.step, c.samples, c.train_wall_s


def _write(fh, record: dict) -> None:
    if fh is not None:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
