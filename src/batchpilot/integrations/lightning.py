"""PyTorch Lightning integration: noise-scale monitor, plan application and doctor in one callback.

``trainer = L.Trainer(callbacks=[BatchpilotCallback(plan="plan.json")], ...)`` does three things:

* **apply a plan** (optional), in ``setup`` before the dataloaders and optimizers exist, the way
  Lightning's own tuner does: the micro-batch goes to ``batch_size`` on the module, its
  ``hparams`` or the datamodule (as ``BatchSizeFinder``), the LR to ``lr``/``learning_rate`` (as
  ``LearningRateFinder``), the warmup to ``warmup_steps`` if such an attribute exists, and
  ``trainer.accumulate_grad_batches`` to the plan's accumulation. At train start it checks that the
  loader, the optimizer and the world size really use the plan's numbers, and stops with a
  :class:`~batchpilot.errors.BatchpilotError` if not, so the global batch never differs silently.
* **run the doctor** (:func:`batchpilot.doctor.check`) on the live module, optimizer, scheduler
  and loader at train start, and report the findings as warnings.
* **monitor the gradient noise scale** B_simple (McCandlish et al. 2018) and log it through
  Lightning's loggers (``pl_module.log``) as ``batchpilot/b_simple`` (with ``_low``/``_high``,
  ``g_sq`` and ``trace_sigma``) once per optimizer step. Two estimators (``estimator=``):
  ``micro-batch``, from the micro-batches of gradient accumulation (Lightning divides each
  micro-batch's loss by ``accumulate_grad_batches``; the estimator uses exactly those weights, see
  :mod:`batchpilot.integrations.grads`); ``per-example``, from per-example gradient norms taken by
  hooks (:mod:`batchpilot.noise.per_example`; Goodfellow 2015, Gray et al. 2023/2024), at any
  accumulation, 1 included. ``auto`` (the default) takes the micro-batch one under accumulation (it
  costs a few percent) and the per-example one without (the only one that works there); docs/noise.md
  has the measured costs.

Limits: the monitor needs automatic optimization, and runs only on single-device runs (with several
ranks it is turned off with a warning); the micro-batch estimator needs ``accumulate_grad_batches >= 2``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import BatchSizeFinder, GradientAccumulationScheduler
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
    from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr, lightning_setattr
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("batchpilot.integrations.lightning needs Lightning: pip install 'batchpilot[lightning]'") from exc

from batchpilot.doctor import Finding, inspect_objects
from batchpilot.errors import BatchpilotError
from batchpilot.integrations.common import (check_every, check_mode, count_samples, noise_logs, report_findings,
                                            run_doctor)
from batchpilot.integrations.grads import MicroBatchGradients
from batchpilot.integrations.plan import PlanSettings, load_plan
from batchpilot.noise.microbatch import GradientNoiseScale, NoiseEstimate
from batchpilot.noise.per_example import PerExampleNoiseScale

ESTIMATORS = ("auto", "per-example", "micro-batch")

LR_ATTRS = ("lr", "learning_rate")
"""Where the plan's LR goes when ``lr_attr`` is not given (the names Lightning's LR finder uses)."""


class BatchpilotCallback(pl.Callback):
    """Apply a batchpilot plan, run the doctor and log the gradient noise scale in a Lightning fit.

    Args:
        plan: a ``plan.json`` path, its dict, or a plan object (``None``: apply nothing).
        monitor_noise: log the noise scale (needs ``accumulate_grad_batches >= 2``).
        count_units: ``fn(batch) -> int``, the units each micro-batch's mean loss is taken over
            (default: samples, the first dimension of the batch's first tensor). Pass a token
            count for per-token losses; B_simple is then in tokens.
        every_n_steps: record one optimizer step in ``n`` (other steps cost nothing).
        doctor: ``warn`` (report findings), ``raise`` (also stop on an error finding) or ``off``.
        doctor_fields: extra facts for the doctor (``base_batch``, ``base_lr``, ``finetune`` ...).
        batch_size_attr: the attribute that sets the dataloaders' batch size.
        lr_attr: the attribute ``configure_optimizers`` reads the LR from (default: ``lr`` or
            ``learning_rate``, whichever exists).
        warmup_attr: the attribute that sets the warmup length, if the module has it.
        noise_monitor: the monitor to feed: a :class:`~batchpilot.noise.microbatch.GradientNoiseScale`
            or a :class:`~batchpilot.noise.per_example.PerExampleNoiseScale` (default: a new one of
            ``estimator``'s kind).
        estimator: ``auto`` (per-example without accumulation, micro-batch with it), ``per-example``
            or ``micro-batch``; ignored when ``noise_monitor`` is given.
        log_prefix: prefix of the logged metric names.
    """

    def __init__(
        self,
        plan: Any = None,
        *,
        monitor_noise: bool = True,
        count_units: Callable[[Any], int] | None = None,
        every_n_steps: int = 1,
        doctor: str = "warn",
        doctor_fields: Mapping[str, Any] | None = None,
        batch_size_attr: str = "batch_size",
        lr_attr: str | None = None,
        warmup_attr: str = "warmup_steps",
        noise_monitor: GradientNoiseScale | PerExampleNoiseScale | None = None,
        estimator: str = "auto",
        log_prefix: str = "batchpilot/",
    ) -> None:
        if estimator not in ESTIMATORS:
            raise BatchpilotError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
        self.plan: PlanSettings | None = None if plan is None else load_plan(plan)
        self.monitor_noise = bool(monitor_noise)
        self.count_units = count_units or count_samples
        self.every_n_steps = check_every(every_n_steps)
        self.doctor = check_mode(doctor)
        self.doctor_fields = dict(doctor_fields or {})
        self.batch_size_attr, self.lr_attr, self.warmup_attr = batch_size_attr, lr_attr, warmup_attr
        self.estimator = estimator if noise_monitor is None else (
            "per-example" if isinstance(noise_monitor, PerExampleNoiseScale) else "micro-batch")
        self._given_monitor = noise_monitor
        self.monitor: GradientNoiseScale | PerExampleNoiseScale = (
            noise_monitor if noise_monitor is not None else GradientNoiseScale())
        self._per_example: PerExampleNoiseScale | None = None
        self._micro_index = 0
        self.log_prefix = log_prefix
        self.findings: list[Finding] = []
        """The doctor's findings at train start."""
        self.applied: dict[str, tuple[Any, Any]] = {}
        """What the plan changed: ``{setting: (old, new)}``."""
        self.history: list[dict[str, float]] = []
        """One entry per recorded step: ``step``, the step's ``g_sq``/``trace_sigma`` and the smoothed estimate."""
        self._grads = MicroBatchGradients(self.monitor)
        self._in_step = False
        self._pending_units: int | None = None
        self._units: list[int] = []
        self._weights: list[float] = []
        self._lr_attr_used: str | None = None

    # -- reading ----------------------------------------------------------------------------
    def estimate(self) -> NoiseEstimate:
        """The current smoothed noise scale with its spread."""
        return self.monitor.estimate()

    # -- plan -------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.plan is not None:
            self._apply_plan(trainer, pl_module, self.plan)

    def _set(self, pl_module: pl.LightningModule, key: str, attr: str, value: Any) -> None:
        old = lightning_getattr(pl_module, attr)
        lightning_setattr(pl_module, attr, value)
        self.applied[key] = (old, value)

    def _apply_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, plan: PlanSettings) -> None:
        if trainer.world_size != plan.world_size:
            raise BatchpilotError(
                f"the plan is for world_size {plan.world_size} but this Trainer runs {trainer.world_size} rank(s) "
                f"(devices x num_nodes); the global batch would be {plan.micro_batch_per_rank * plan.accumulation_steps * trainer.world_size}, "
                f"not {plan.global_batch}")
        if not lightning_hasattr(pl_module, self.batch_size_attr):
            raise BatchpilotError(
                f"cannot apply the plan's micro_batch_per_rank {plan.micro_batch_per_rank}: neither the LightningModule, "
                f"its hparams nor the datamodule has `{self.batch_size_attr}` (build the dataloaders from it, "
                "or pass batch_size_attr=...)")
        lr_attr = self.lr_attr or next((a for a in LR_ATTRS if lightning_hasattr(pl_module, a)), None)
        if lr_attr is None or not lightning_hasattr(pl_module, lr_attr):
            raise BatchpilotError(
                f"cannot apply the plan's lr {plan.lr:g}: the LightningModule has no `{self.lr_attr or 'lr'}` "
                "attribute or hparam (read the LR from it in configure_optimizers, or pass lr_attr=...)")
        if any(isinstance(cb, GradientAccumulationScheduler) for cb in trainer.callbacks):
            raise BatchpilotError("cannot apply the plan's accumulation_steps: a GradientAccumulationScheduler "
                                  "callback also sets it; remove one of the two")
        self._set(pl_module, "batch_size", self.batch_size_attr, plan.micro_batch_per_rank)
        self._set(pl_module, "lr", lr_attr, plan.lr)
        self._lr_attr_used = lr_attr
        if lightning_hasattr(pl_module, self.warmup_attr):
            self._set(pl_module, "warmup_steps", self.warmup_attr, plan.warmup_steps)
        self.applied["accumulate_grad_batches"] = (trainer.accumulate_grad_batches, plan.accumulation_steps)
        trainer.accumulate_grad_batches = plan.accumulation_steps
        changes = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in self.applied.items())
        rank_zero_info(f"batchpilot: applied the plan (global batch {plan.global_batch}): {changes}")

    def _verify_plan(self, trainer: pl.Trainer, optimizer: Any, scheduler: Any, loader: Any, plan: PlanSettings) -> None:
        seen = inspect_objects(optimizer=optimizer, scheduler=scheduler, data_loader=loader)
        batch = seen.get("micro_batch_per_rank")
        if batch is not None and batch != plan.micro_batch_per_rank:
            raise BatchpilotError(
                f"the train dataloader has batch_size {batch}, the plan micro_batch_per_rank {plan.micro_batch_per_rank}: "
                f"build it from `{self.batch_size_attr}` (a loader passed to fit() directly is not changed)")
        if trainer.accumulate_grad_batches != plan.accumulation_steps:
            raise BatchpilotError(f"accumulate_grad_batches is {trainer.accumulate_grad_batches}, "
                                  f"the plan's accumulation_steps {plan.accumulation_steps}")
        lr = seen.get("lr")
        if lr is not None and not math.isclose(lr, plan.lr, rel_tol=1e-6):
            raise BatchpilotError(
                f"the optimizer's peak LR is {lr:g}, the plan's lr {plan.lr:g}: configure_optimizers must read the LR "
                f"from `{self._lr_attr_used or self.lr_attr or 'lr'}`")
        warmup = seen.get("warmup_steps")
        if plan.warmup_steps and warmup is not None and warmup != plan.warmup_steps:
            rank_zero_warn(f"batchpilot: the scheduler warms up over {warmup} steps, the plan over {plan.warmup_steps}")
        elif plan.warmup_steps and scheduler is None:
            rank_zero_warn(f"batchpilot: the plan asks for {plan.warmup_steps} warmup steps but no LR scheduler is configured")

    # -- train start: verify, doctor, install the monitor -----------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        configs = trainer.lr_scheduler_configs
        scheduler = configs[0].scheduler if configs else None
        loader = trainer.train_dataloader
        if self.plan is not None:
            self._verify_plan(trainer, optimizer, scheduler, loader, self.plan)
        if self.doctor != "off":
            known: dict[str, Any] = {"world_size": trainer.world_size}
            if scheduler is None:
                known["warmup_steps"] = 0  # no scheduler: a constant LR from step 0
            if any(isinstance(cb, BatchSizeFinder) for cb in trainer.callbacks):
                known["batch_source"] = "max_fit"  # Lightning's finder picks the largest batch that fits
            if pl_module.automatic_optimization:  # Lightning zeroes, scales the loss and steps the scheduler
                known.update(zero_grad="per_optimizer_step", scheduler_step="per_optimizer_step",
                             loss_scaled_by_accumulation=True)
            self.findings = run_doctor(
                model=pl_module, optimizer=optimizer, scheduler=scheduler, data_loader=loader,
                accumulation_steps=trainer.accumulate_grad_batches, plan=self.plan, known=known,
                user_fields=self.doctor_fields)
            report_findings(self.findings, self.doctor, rank_zero_warn, rank_zero_info)
        if self.monitor_noise:
            self._install(trainer, pl_module)

    def _install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        why = None
        if not pl_module.automatic_optimization:
            why = "it needs automatic optimization (the loss weights of manual backward calls are unknown)"
        elif trainer.world_size > 1:
            why = f"it runs on single-device fits only (this fit has {trainer.world_size} ranks)"
        accumulating = trainer.accumulate_grad_batches >= 2 or any(
            isinstance(cb, GradientAccumulationScheduler) for cb in trainer.callbacks)
        kind = self.estimator if self.estimator != "auto" else ("micro-batch" if accumulating else "per-example")
        if why is None and kind == "micro-batch" and not accumulating:
            why = ("the micro-batch estimator needs two batch sizes: set accumulate_grad_batches >= 2 "
                   "(same global batch, smaller micro-batches; the result is unchanged without BatchNorm), "
                   "or estimator='per-example'")
        if why:
            rank_zero_warn(f"batchpilot: the noise-scale monitor is off: {why}")
            return
        self._in_step = False
        if kind == "per-example":
            mon = self._given_monitor if isinstance(self._given_monitor, PerExampleNoiseScale) else PerExampleNoiseScale()
            mon.attach(pl_module)
            self.monitor, self._per_example = mon, mon
            return
        self._grads.install(pl_module.parameters())

    # -- per micro-batch and per step -------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        pe = self._per_example
        if pe is not None:
            if not self._in_step:
                self._in_step, self._micro_index = True, 0
                pe.active = trainer.global_step % self.every_n_steps == 0
            self._pending_units = int(self.count_units(batch)) if pe.active else None
            return
        if not self._grads.installed:
            return
        if not self._in_step:
            self._in_step = True
            self._units, self._weights = [], []
            self._grads.start_step(active=trainer.global_step % self.every_n_steps == 0)
        self._pending_units = int(self.count_units(batch)) if self._grads.recording else None

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pe = self._per_example
        if pe is not None:  # p.grad right after the backward: before Lightning clips or unscales it
            if pe.active and self._pending_units is not None:
                # Lightning's loss: micro-batch mean / k, i.e. the step's mean for equal micro-batches
                pe.loss_scale = _grad_scale(trainer)
                pe.after_micro(self._micro_index, self._pending_units)
                self._micro_index += 1
            self._pending_units = None
            return
        if not (self._grads.installed and self._grads.recording) or self._pending_units is None:
            return
        self._grads.end_micro(_grad_scale(trainer))
        self._units.append(self._pending_units)
        self._weights.append(1.0 / trainer.accumulate_grad_batches)  # Lightning: loss / accumulate_grad_batches
        self._pending_units = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        pe = self._per_example
        if pe is None and not (self._grads.installed and self._in_step):
            return
        if pe is not None and not self._in_step:
            return
        self._in_step = False
        pair = (pe.end_step() if pe.active else None) if pe is not None else self._grads.end_step(self._units, self._weights)
        if pair is None:
            return
        est = self.monitor.estimate()
        self.history.append({"step": float(trainer.global_step), "step_g_sq": pair[0], "step_trace_sigma": pair[1],
                             **{k: float(v) for k, v in est.to_dict().items() if isinstance(v, (int, float))}})
        logs = noise_logs(est, self.log_prefix)
        if logs and trainer.loggers:
            pl_module.log_dict(logs, on_step=True, on_epoch=False, prog_bar=False, logger=True)

    # -- cleanup ----------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove()

    def _remove(self) -> None:
        self._grads.remove()
        if self._per_example is not None:
            self._per_example.detach()
            self._per_example = None


def _grad_scale(trainer: pl.Trainer) -> float:
    """The AMP loss scale of the current backward (1 without a scaler)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
