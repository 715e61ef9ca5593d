"""``batchpilot.doctor.check``: inspect live training objects without changing them.

The inspector only reads attributes: module types, optimizer param groups and state
counters, scheduler attributes, the loader's batch size and dataset length. It never
steps, iterates or copies anything; the one call into user code is evaluating a
``LambdaLR``'s ``lr_lambda`` (assumed pure, as the scheduler itself assumes) to find
its warmup length and peak factor. What it infers becomes a :class:`DoctorConfig`
(``kind="live"``); fields passed as keywords override the inference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn
from torch.optim import lr_scheduler as lrs

from batchpilot.doctor.diagnose import diagnose
from batchpilot.doctor.findings import Finding
from batchpilot.doctor.schema import FIELDS, DoctorConfig, parse_config
from batchpilot.errors import BatchpilotError, require_positive_int
from batchpilot.norm import normalization_of

LAMBDA_SCAN_STEPS = 100_000
"""How many steps of a ``LambdaLR`` factor are evaluated to find its warmup and peak."""


def _parallel_of(model: nn.Module) -> tuple[str, int | None]:
    """``("dp", devices)``, ``("ddp", None)``, ``("fsdp", None)`` or ``("none", None)``."""
    if isinstance(model, nn.DataParallel):
        return "dp", len(model.device_ids or [])
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "ddp", None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - builds without distributed
        FullyShardedDataParallel = ()  # type: ignore[assignment,misc]
    if FullyShardedDataParallel and isinstance(model, FullyShardedDataParallel):
        return "fsdp", None
    return "none", None


def _optimizer_steps(optimizer: Any) -> int | None:
    """Optimizer steps so far from the per-parameter ``step`` counters (Adam family); ``None`` if absent."""
    steps = [int(s["step"]) for s in getattr(optimizer, "state", {}).values() if isinstance(s, dict) and "step" in s]
    return max(steps) if steps else None


def _lambda_warmup(sched: lrs.LambdaLR) -> tuple[int, float] | None:
    """(warmup steps, peak factor) of a LambdaLR's first ``lr_lambda``; ``None`` if it cannot be evaluated."""
    fn = sched.lr_lambdas[0]
    try:
        factors = [float(fn(step)) for step in range(LAMBDA_SCAN_STEPS)]
    except Exception:  # user code: anything may go wrong; then we do not know
        return None
    peak = max(factors)
    if not peak > 0:
        return None
    first_peak = next(i for i, f in enumerate(factors) if f >= 0.999 * peak)
    return first_peak, peak


def _scheduler_warmup(sched: Any) -> tuple[int | None, float]:
    """(warmup steps or ``None`` if unknown, peak factor over the optimizer's initial LR)."""
    if isinstance(sched, lrs.OneCycleLR):
        phases = getattr(sched, "_schedule_phases", None)
        return (int(phases[0]["end_step"]) if phases else None), 1.0
    if isinstance(sched, lrs.LinearLR):
        return (int(sched.total_iters) if sched.start_factor < sched.end_factor else 0), max(sched.start_factor, sched.end_factor)
    if isinstance(sched, lrs.ConstantLR):
        return (int(sched.total_iters) if sched.factor < 1 else 0), 1.0
    if isinstance(sched, (lrs.SequentialLR, lrs.ChainedScheduler)):
        children = getattr(sched, "_schedulers", [])
        return _scheduler_warmup(children[0]) if children else (None, 1.0)
    if isinstance(sched, lrs.LambdaLR):
        found = _lambda_warmup(sched)
        return (found[0], found[1]) if found else (None, 1.0)
    if isinstance(sched, (lrs.StepLR, lrs.MultiStepLR, lrs.ExponentialLR, lrs.CosineAnnealingLR,
                          lrs.CosineAnnealingWarmRestarts, lrs.PolynomialLR, lrs.MultiplicativeLR, lrs.ReduceLROnPlateau)):
        return 0, 1.0
    return None, 1.0


def _peak_lr(optimizer: Any, factor: float) -> float | None:
    lrs_ = []
    for group in getattr(optimizer, "param_groups", []):
        base = group.get("max_lr", group.get("initial_lr", group.get("lr")))
        if isinstance(base, (int, float)):
            lrs_.append(float(base) * (factor if "max_lr" not in group else 1.0))
    return max(lrs_) if lrs_ else None


def _count(obj: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            try:
                return int(value)
            except (TypeError, ValueError, RuntimeError):
                return None
    return None


def _per_step(calls: int | None, optimizer_steps: int | None) -> str | None:
    """``per_micro_batch`` when a hook ran at least 1.5x as often as the optimizer stepped."""
    if calls is None or not optimizer_steps:
        return None
    return "per_micro_batch" if calls >= 1.5 * optimizer_steps else "per_optimizer_step"


def inspect_objects(model: nn.Module | None = None, optimizer: Any = None, scheduler: Any = None,
                    data_loader: Any = None, ema: Any = None, accumulation_steps: int = 1) -> dict[str, Any]:
    """The config fields that can be read off live objects (see :func:`check`)."""
    require_positive_int("accumulation_steps", accumulation_steps)
    out: dict[str, Any] = {"accumulation_steps": accumulation_steps}
    devices = None
    if model is not None:
        out["normalization"] = list(normalization_of(model))
        out["parallel"], devices = _parallel_of(model)
    if optimizer is not None:
        out["optimizer"] = type(optimizer).__name__
    warmup, factor = (None, 1.0)
    if scheduler is not None:
        warmup, factor = _scheduler_warmup(scheduler)
        if warmup is not None:
            out["warmup_steps"] = warmup
    peak = _peak_lr(optimizer, factor) if optimizer is not None else None
    if peak is not None and peak > 0:
        out["lr"] = peak
    opt_steps = _optimizer_steps(optimizer) if optimizer is not None else None
    if accumulation_steps > 1 and scheduler is not None:
        out["scheduler_step"] = _per_step(_count(scheduler, "last_epoch"), opt_steps)
    if ema is not None:
        out["ema_step"] = _per_step(_count(ema, "n_averaged", "num_updates"), opt_steps) if accumulation_steps > 1 else "per_optimizer_step"
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    if data_loader is not None:
        batch = getattr(data_loader, "batch_size", None) or getattr(getattr(data_loader, "batch_sampler", None), "batch_size", None)
        if isinstance(batch, int):
            if devices and devices > 1 and batch % devices == 0:  # DataParallel splits the loader's batch
                batch, world = batch // devices, devices
            out["micro_batch_per_rank"] = batch
        drop = getattr(data_loader, "drop_last", None)
        if isinstance(drop, bool):
            out["drop_last"] = drop
        try:
            out["dataset_size"] = len(data_loader.dataset)
        except (TypeError, AttributeError, NotImplementedError):
            pass
    if world is None and devices:
        world = devices
    if world is not None:
        out["world_size"] = world
    return {k: v for k, v in out.items() if v is not None}


def check(model: nn.Module | None = None, optimizer: Any = None, scheduler: Any = None, data_loader: Any = None,
          *, ema: Any = None, accumulation_steps: int = 1, **fields: Any) -> list[Finding]:
    """Check live training objects for the batch-size pitfalls; nothing is modified.

    Args:
        model: the (possibly DataParallel/DDP-wrapped) model: normalization layers and parallelism.
        optimizer: optimizer class (LR rule) and peak LR (``max_lr``/``initial_lr``/``lr``).
        scheduler: warmup length and peak factor; with accumulation, its step count against the optimizer's.
        data_loader: micro-batch per rank (its ``batch_size``), ``drop_last`` and the dataset length.
        ema: an EMA of the weights (``torch.optim.swa_utils.AveragedModel`` or anything with
            ``n_averaged``/``num_updates``); its update count against the optimizer's.
        accumulation_steps: micro-batches per optimizer step.
        **fields: any config field (``base_batch``, ``base_lr``, ``world_size``, ``finetune``,
            ``validated``, ``ema_step``, ``scheduler_step`` ...); overrides what was inferred.

    Returns:
        The findings, most severe first.

    Raises:
        BatchpilotError: an unknown field name or a bad field value.
    """
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise BatchpilotError(f"unknown doctor field(s): {', '.join(unknown)}; see docs/doctor.md")
    inferred = inspect_objects(model, optimizer, scheduler, data_loader, ema, accumulation_steps)
    given = parse_config(fields, kind="live")
    cfg = parse_config(inferred, kind="live")
    overrides = {f.name: getattr(given, f.name) for f in dataclasses.fields(DoctorConfig)
                 if f.name not in ("kind", "unknown") and getattr(given, f.name) is not None}
    return diagnose(dataclasses.replace(cfg, **overrides))
