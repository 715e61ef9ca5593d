"""The Hugging Face ``TrainerCallback``: doctor, plan check and gradient-noise-scale monitor.

How the noise scale is measured: the Trainer clips (and, with fp16, unscales) the gradients
*before* its ``on_pre_optimizer_step`` callback, so ``p.grad`` read there is no longer the sum of
the micro-batch gradients. The callback therefore records each micro-batch's gradient inside the
backward pass with parameter hooks (:mod:`batchpilot.integrations.grads`) and uses the callback
events only as boundaries: ``on_step_begin`` (a step starts), ``on_substep_end`` (a micro-batch
ends) and ``on_pre_optimizer_step`` (the last micro-batch ends). A forward pre-hook on the model
reads the micro-batch's size and the Trainer's loss normalisation: with ``num_items_in_batch``
(models that accept loss kwargs) micro-batch ``i`` is weighted ``n_i/N`` by its label count,
otherwise ``1/k``. Exact for both; with a ``compute_loss_func`` or label smoothing the labels are
not passed to the model, and equal weights ``1/k`` are assumed (exact when the micro-batches have
equal unit counts).

The unscaled-loss trap: a model whose ``forward`` takes ``**kwargs`` makes the Trainer pass
``num_items_in_batch`` and skip its division by ``gradient_accumulation_steps``; if the model then
ignores ``num_items_in_batch`` and returns a mean loss (many classification heads,
huggingface/transformers#47688), the gradient is ``k`` times the batch mean. The callback tests
this once, on the first micro-batch, with two extra no-grad forwards in eval mode that differ
only in ``num_items_in_batch`` (RNG forked, module modes restored), and reports the doctor's
``BP105`` if the loss does not change.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Mapping

try:
    from transformers import TrainerCallback, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("batchpilot.integrations.hf needs transformers: pip install 'batchpilot[hf]'") from exc

import torch

from batchpilot.doctor import Finding
from batchpilot.errors import BatchpilotError
from batchpilot.integrations.common import (check_every, check_mode, count_samples, noise_logs, report_findings,
                                            run_doctor, unwrap)
from batchpilot.integrations.grads import MicroBatchGradients
from batchpilot.integrations.hf_args import check_training_arguments
from batchpilot.integrations.plan import PlanSettings, load_plan
from batchpilot.noise.microbatch import GradientNoiseScale, NoiseEstimate

log = logging.getLogger("batchpilot.integrations.hf")


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def _loss_of(output: Any) -> torch.Tensor | None:
    loss = output.get("loss") if isinstance(output, Mapping) else (output[0] if isinstance(output, (tuple, list)) else None)
    return loss.detach().double() if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


def ignores_num_items(module: torch.nn.Module, args: tuple, kwargs: dict) -> bool | None:
    """Whether ``module`` returns the same loss for ``num_items_in_batch`` N and 2N (it ignores it).

    Two no-grad forwards in eval mode, with the RNG forked and every submodule's mode restored.
    Returns ``True`` (ignored), ``False`` (the loss halves: it is used) or ``None`` (undecided).
    """
    n = kwargs["num_items_in_batch"]
    modes = [(m, m.training) for m in module.modules()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            module.eval()
            a = _loss_of(module(*args, **kwargs))
            b = _loss_of(module(*args, **{**kwargs, "num_items_in_batch": n * 2}))
    finally:
        for m, mode in modes:
            m.training = mode
    if a is None or b is None or not bool(torch.isfinite(a)) or float(a) == 0.0:
        return None
    if torch.allclose(a, b, rtol=1e-6, atol=0.0):
        return True
    if torch.allclose(a, 2 * b, rtol=1e-4, atol=0.0):
        return False
    return None


class BatchpilotCallback(TrainerCallback):
    """Doctor, plan check and gradient-noise-scale monitor for the Hugging Face ``Trainer``.

    The estimate is added to the Trainer's logs as ``batchpilot/b_simple`` (``_low``, ``_high``,
    ``g_sq``, ``trace_sigma``) at each logging step. Reporting integrations (TensorBoard, W&B ...)
    see these keys only when this callback runs before them: add it with :func:`attach`.

    Args:
        plan: a plan the ``TrainingArguments`` must match (``None``: no check).
        monitor_noise: measure the noise scale (needs ``gradient_accumulation_steps >= 2``).
        count_units: ``fn(inputs: dict) -> int`` units of a micro-batch (default: samples, or the
            Trainer's own label count when it normalises by ``num_items_in_batch``).
        every_n_steps: record one optimizer step in ``n``.
        doctor: ``warn``, ``raise`` (stop on an error finding) or ``off``.
        doctor_fields: extra facts for the doctor (``base_batch``, ``base_lr``, ``finetune`` ...).
        noise_monitor: the :class:`~batchpilot.noise.microbatch.GradientNoiseScale` to feed.
        log_prefix: prefix of the logged keys.
    """

    def __init__(
        self,
        plan: Any = None,
        *,
        monitor_noise: bool = True,
        count_units: Callable[[Mapping[str, Any]], int] | None = None,
        every_n_steps: int = 1,
        doctor: str = "warn",
        doctor_fields: Mapping[str, Any] | None = None,
        noise_monitor: GradientNoiseScale | None = None,
        log_prefix: str = "batchpilot/",
    ) -> None:
        self.plan: PlanSettings | None = None if plan is None else load_plan(plan)
        self.monitor_noise = bool(monitor_noise)
        self.count_units = count_units
        self.every_n_steps = check_every(every_n_steps)
        self.doctor = check_mode(doctor)
        self.doctor_fields = dict(doctor_fields or {})
        self.monitor = noise_monitor if noise_monitor is not None else GradientNoiseScale()
        self.log_prefix = log_prefix
        self.findings: list[Finding] = []
        self.history: list[dict[str, float]] = []
        """One entry per recorded step: ``step``, the step's ``g_sq``/``trace_sigma`` and the smoothed estimate."""
        self._grads = MicroBatchGradients(self.monitor)
        self._fwd_handle: Any = None
        self._micro_open = False
        self._pending: dict[str, Any] | None = None
        self._micros: list[dict[str, Any] | None] = []
        self._doctor_inputs: dict[str, Any] = {}
        self._probe_pending = False
        self._probing = False
        self.loss_ignores_num_items: bool | None = None
        """Set on the first micro-batch when the Trainer passes ``num_items_in_batch``: ``True`` if the
        model ignores it (its loss is then ``k`` times the batch mean, see ``BP105``)."""

    def estimate(self) -> NoiseEstimate:
        """The current smoothed noise scale with its spread."""
        return self.monitor.estimate()

    # -- train start ------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kwargs):
        check_training_arguments(args, self.plan)
        k = int(args.gradient_accumulation_steps)
        self._doctor_inputs = dict(
            model=model, optimizer=unwrap(optimizer, "optimizer"), scheduler=unwrap(lr_scheduler, "scheduler"),
            data_loader=train_dataloader, accumulation_steps=k, plan=self.plan, user_fields=self.doctor_fields,
            known={"world_size": int(args.world_size), "zero_grad": "per_optimizer_step",
                   "scheduler_step": "per_optimizer_step", "loss_scaled_by_accumulation": True})
        if self.doctor != "off":
            self.findings = run_doctor(**self._doctor_inputs)
            report_findings(self.findings, self.doctor, _warn, log.info)
        if model is None:
            return
        monitoring = self.monitor_noise and self._monitor_possible(args)
        if monitoring:
            self._grads.install(model.parameters())
        self._probe_pending = k > 1 and (monitoring or self.doctor != "off")
        if self._fwd_handle is not None:
            self._fwd_handle.remove()
            self._fwd_handle = None
        if monitoring or self._probe_pending:
            self._fwd_handle = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    def _monitor_possible(self, args: TrainingArguments) -> bool:
        why = None
        if not hasattr(TrainerCallback, "on_pre_optimizer_step"):
            why = "this transformers has no on_pre_optimizer_step event (upgrade: pip install 'batchpilot[hf]')"
        elif int(args.world_size) > 1 or int(args.n_gpu) > 1:
            why = f"it runs on single-device runs only (world_size {args.world_size}, n_gpu {args.n_gpu})"
        elif int(args.gradient_accumulation_steps) < 2:
            why = ("it needs two batch sizes: set gradient_accumulation_steps >= 2 "
                   "(same global batch, smaller micro-batches; the result is unchanged without BatchNorm)")
        if why:
            _warn(f"batchpilot: the noise-scale monitor is off: {why}")
        return why is None

    def _probe(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Once: does the model use ``num_items_in_batch``? If not, report BP105 (and stop with doctor='raise')."""
        self._probe_pending, self._probing = False, True
        try:
            self.loss_ignores_num_items = ignores_num_items(module, args, kwargs)
        finally:
            self._probing = False
        if not self.loss_ignores_num_items or self.doctor == "off":
            return
        k = self._doctor_inputs["accumulation_steps"]
        _warn(f"batchpilot: {type(module).__name__}.forward takes **kwargs, so the Trainer passes num_items_in_batch "
              f"and does not divide the loss by gradient_accumulation_steps {k}, but the model returns the same loss "
              f"for any num_items_in_batch (huggingface/transformers#47688): each optimizer step sums {k} micro-batch "
              f"mean gradients. Fix: set `model.accepts_loss_kwargs = False` before building the Trainer")
        inputs = dict(self._doctor_inputs, known={**self._doctor_inputs["known"], "loss_scaled_by_accumulation": False})
        new = [f for f in run_doctor(**inputs) if f.code == "BP105"]
        self.findings.extend(new)
        try:
            report_findings(new, self.doctor, _warn, log.info)
        except BatchpilotError:
            self._remove()
            raise

    def _remove(self) -> None:
        self._grads.remove()
        if self._fwd_handle is not None:
            self._fwd_handle.remove()
            self._fwd_handle = None

    # -- micro-batch bookkeeping ------------------------------------------------------------
    def _on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._probing or not module.training:
            return
        if self._probe_pending and kwargs.get("num_items_in_batch") is not None:
            self._probe(module, args, kwargs)
        if not self._grads.recording or self._micro_open:
            return  # the first forward of a micro-batch is the one that carries its inputs
        self._micro_open = True
        info: dict[str, Any] = {}
        labels = kwargs.get("labels")
        if self.count_units is not None:
            info["units"] = int(self.count_units(kwargs))
        else:
            info["units"] = count_samples(labels if isinstance(labels, torch.Tensor) else (list(args), kwargs))
        n_items = kwargs.get("num_items_in_batch")
        if n_items is not None and isinstance(labels, torch.Tensor):
            info["n_items"] = float(torch.as_tensor(n_items).sum())
            info["raw"] = int(labels.ne(-100).sum())
            info["shifted"] = int(labels[..., 1:].ne(-100).sum()) if labels.dim() >= 2 else info["raw"]
        self._pending = info

    def _close_micro(self, optimizer: Any) -> None:
        if not self._grads.recording:
            return
        scaler = getattr(optimizer, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self._grads.end_micro(scale)
        self._micros.append(self._pending if self._micro_open else None)
        self._micro_open, self._pending = False, None

    def _units_and_weights(self) -> tuple[list[float], list[float]]:
        """Units and loss weights ``c_i`` of the step's micro-batches, as the Trainer normalised them."""
        micros = self._micros
        if not micros or any(m is None for m in micros):
            return [], []
        if all("n_items" in m for m in micros):  # the Trainer passed num_items_in_batch N to the model
            n = micros[0]["n_items"]
            if self.count_units is not None:
                units = [float(m["units"]) for m in micros]
            else:  # count the labels as the Trainer did: labels[..., 1:] for causal LMs, all labels otherwise
                key = next((k for k in ("shifted", "raw") if abs(sum(m[k] for m in micros) - n) < 0.5), "raw")
                units = [float(m[key]) for m in micros]
            if self.loss_ignores_num_items:  # a mean over the micro-batch, and the Trainer does not divide it
                return units, [1.0] * len(micros)
            return units, [u / n for u in units]  # each micro-batch's loss sum divided by N
        units = [float(m["units"]) for m in micros]
        return units, [1.0 / len(micros)] * len(micros)  # mean loss / current_gradient_accumulation_steps

    def on_step_begin(self, args, state, control, **kwargs):
        if self._grads.installed:
            self._grads.start_step(active=state.global_step % self.every_n_steps == 0)
            self._micros, self._micro_open, self._pending = [], False, None

    def on_substep_end(self, args, state, control, optimizer=None, **kwargs):
        self._close_micro(optimizer)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self._grads.recording:
            return
        self._close_micro(optimizer)
        units, weights = self._units_and_weights()
        pair = self._grads.end_step(units, weights)
        if pair is None:
            return
        est = self.monitor.estimate()
        self.history.append({"step": float(state.global_step), "step_g_sq": pair[0], "step_trace_sigma": pair[1],
                             **{k: float(v) for k, v in est.to_dict().items() if isinstance(v, (int, float))}})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self.history or "loss" not in logs:
            return  # nothing measured yet, or an evaluation log
        extra = noise_logs(self.monitor.estimate(), self.log_prefix)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove()
        self._doctor_inputs = {}


def attach(trainer: Any, callback: BatchpilotCallback | None = None, **kwargs: Any) -> BatchpilotCallback:
    """Add a :class:`BatchpilotCallback` to ``trainer`` ahead of its reporting callbacks; returns it.

    Placed first, its ``batchpilot/*`` keys reach TensorBoard, W&B and the other ``report_to``
    integrations in the same ``on_log`` call. ``kwargs`` build the callback when none is given.
    """
    cb = callback if callback is not None else BatchpilotCallback(**kwargs)
    trainer.callback_handler.callbacks.insert(0, cb)
    return cb
