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

The per-example estimator (``estimator="per-example"``, or ``auto`` without accumulation:
:mod:`batchpilot.noise.per_example`, Goodfellow 2015, Gray et al. 2023/2024) takes per-example
gradient norms from layer hooks at every micro-batch, and the batch gradient's norm inside the
backward (post-accumulate-grad hooks, so before the Trainer clips). Each example's units are its
label count (labels ``[..., 1:]`` for sequence labels) when the Trainer passes ``num_items_in_batch``
(the loss is each micro-batch's sum over N), else the micro-batch's units split equally (its mean
loss over ``k``: exact for equal micro-batches).

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
from batchpilot.noise.per_example import PerExampleNoiseScale

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
        noise_monitor: the monitor to feed: a :class:`~batchpilot.noise.microbatch.GradientNoiseScale`
            or a :class:`~batchpilot.noise.per_example.PerExampleNoiseScale`.
        estimator: ``auto`` (per-example without accumulation, micro-batch with it), ``per-example`` or
            ``micro-batch``; ignored when ``noise_monitor`` is given.
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
        noise_monitor: GradientNoiseScale | PerExampleNoiseScale | None = None,
        estimator: str = "auto",
        log_prefix: str = "batchpilot/",
    ) -> None:
        if estimator not in ("auto", "per-example", "micro-batch"):
            raise BatchpilotError(f"estimator must be auto, per-example or micro-batch, got {estimator!r}")
        self.estimator = estimator if noise_monitor is None else (
            "per-example" if isinstance(noise_monitor, PerExampleNoiseScale) else "micro-batch")
        self._given_monitor = noise_monitor
        self._per_example: PerExampleNoiseScale | None = None
        self._micro_index = 0
        self.plan: PlanSettings | None = None if plan is None else load_plan(plan)
        self.monitor_noise = bool(monitor_noise)
        self.count_units = count_units
        self.every_n_steps = check_every(every_n_steps)
        self.doctor = check_mode(doctor)
        self.doctor_fields = dict(doctor_fields or {})
        self.monitor: GradientNoiseScale | PerExampleNoiseScale = (
            noise_monitor if noise_monitor is not None else GradientNoiseScale())
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
        self._in_step = False
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
        kind = self.estimator if self.estimator != "auto" else ("micro-batch" if k > 1 else "per-example")
        monitoring = self.monitor_noise and self._monitor_possible(args, kind)
        if monitoring and kind == "per-example":
            mon = self._given_monitor if isinstance(self._given_monitor, PerExampleNoiseScale) else PerExampleNoiseScale()
            mon.grad_hooks = True  # the Trainer clips p.grad before on_pre_optimizer_step
            mon.attach(model)
            self.monitor, self._per_example = mon, mon
        elif monitoring:
            self._grads.install(model.parameters())
        self._probe_pending = k > 1 and (monitoring or self.doctor != "off")
        if self._fwd_handle is not None:
            self._fwd_handle.remove()
            self._fwd_handle = None
        if monitoring or self._probe_pending:
            self._fwd_handle = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    def _monitor_possible(self, args: TrainingArguments, kind: str) -> bool:
        why = None
        if not hasattr(TrainerCallback, "on_pre_optimizer_step"):
            why = "this transformers has no on_pre_optimizer_step event (upgrade: pip install 'batchpilot[hf]')"
        elif int(args.world_size) > 1 or int(args.n_gpu) > 1:
            why = f"it runs on single-device runs only (world_size {args.world_size}, n_gpu {args.n_gpu})"
        elif int(args.gradient_accumulation_steps) < 2 and kind == "micro-batch":
            why = ("the micro-batch estimator needs two batch sizes: set gradient_accumulation_steps >= 2 "
                   "(same global batch, smaller micro-batches; the result is unchanged without BatchNorm), "
                   "or estimator='per-example'")
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

    @property
    def _recording(self) -> bool:
        pe = self._per_example
        return self._grads.recording or (pe is not None and pe.active and self._in_step)

    def _remove(self) -> None:
        self._grads.remove()
        if self._per_example is not None:
            self._per_example.detach()
            self._per_example = None
        if self._fwd_handle is not None:
            self._fwd_handle.remove()
            self._fwd_handle = None

    # -- micro-batch bookkeeping ------------------------------------------------------------
    def _on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._probing or not module.training:
            return
        if self._probe_pending and kwargs.get("num_items_in_batch") is not None:
            self._probe(module, args, kwargs)
        if not self._recording or self._micro_open:
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
            if self._per_example is not None and self.count_units is None and labels.dim() >= 1:
                # each example's label count, counted the way N was (all labels, or labels[..., 1:])
                k = int(self._doctor_inputs.get("accumulation_steps", 1))
                shifted = labels.dim() >= 2 and abs(info["shifted"] * k - info["n_items"]) < abs(info["raw"] * k - info["n_items"])
                valid = (labels[..., 1:] if shifted else labels).ne(-100)
                info["each"] = valid.reshape(len(valid), -1).sum(1).double()
        self._pending = info

    def _close_micro(self, optimizer: Any) -> None:
        pe = self._per_example
        if pe is not None:
            if self._recording:
                info = self._pending if self._micro_open else None
                self._micros.append(info)
                if info is not None:
                    each = info.get("each")
                    units = each if each is not None and bool((each > 0).all()) else info["units"]
                    pe.after_micro(self._micro_index, units)
                    info["passed"] = float(each.sum()) if units is each else float(info["units"])
                self._micro_index += 1
                self._micro_open, self._pending = False, None
            return
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
        if self._per_example is not None:
            self._per_example.active = state.global_step % self.every_n_steps == 0
            self._in_step, self._micro_index = True, 0
            self._micros, self._micro_open, self._pending = [], False, None
        if self._grads.installed:
            self._grads.start_step(active=state.global_step % self.every_n_steps == 0)
            self._micros, self._micro_open, self._pending = [], False, None

    def on_substep_end(self, args, state, control, optimizer=None, **kwargs):
        self._close_micro(optimizer)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        pe = self._per_example
        if pe is not None:
            if not self._recording:
                self._in_step = False
                return
            self._close_micro(optimizer)
            self._in_step = False
            pair = self._per_example_step(pe, optimizer)
        elif not self._grads.recording:
            return
        else:
            self._close_micro(optimizer)
            units, weights = self._units_and_weights()
            pair = self._grads.end_step(units, weights)
        if pair is None:
            return
        est = self.monitor.estimate()
        self.history.append({"step": float(state.global_step), "step_g_sq": pair[0], "step_trace_sigma": pair[1],
                             **{k: float(v) for k, v in est.to_dict().items() if isinstance(v, (int, float))}})

    def _per_example_step(self, pe: PerExampleNoiseScale, optimizer: Any) -> tuple[float, float] | None:
        """End the per-example monitor's step with the loss scale the Trainer's normalisation implies.

        The monitor assumes each micro-batch's loss is its units' sum over the step's passed units U;
        the Trainer's is the sum over N (``num_items_in_batch``: scale U/N), or the micro-batch mean
        over k (equal micro-batches: scale 1), or, when the model ignores ``num_items_in_batch``, the
        micro-batch mean (scale k)."""
        micros = self._micros
        if not micros or any(m is None for m in micros):
            pe.end_step()
            return None
        scaler = getattr(optimizer, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        passed = sum(m["passed"] for m in micros)
        if all("n_items" in m for m in micros) and not self.loss_ignores_num_items:
            scale *= passed / micros[0]["n_items"]
        elif self.loss_ignores_num_items:
            scale *= len(micros)
        pe.loss_scale = scale
        return pe.end_step()

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
