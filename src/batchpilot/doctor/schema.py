"""The doctor's config schema: what a training config or plan may say, validated.

Every field is optional: a missing field skips the checks that need it (the doctor
says which, as ``BP002``), it never guesses. Field names and aliases are listed in
:data:`FIELDS` and documented in ``docs/doctor.md``. A value of the wrong type or
out of range is a malformed config: :class:`BatchpilotError` (CLI exit 2).
Unknown keys are kept so that the doctor can point at typos (``BP001``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

from batchpilot.errors import BatchpilotError, short_repr
from batchpilot.scaling.lr_rules import LR_RULES

STEP_WHEN = ("per_micro_batch", "per_optimizer_step")
PARALLEL = ("none", "dp", "ddp", "fsdp")
BATCH_SOURCES = ("tuned", "paper", "max_fit", "plan", "sweep")
NORMS = ("batchnorm", "syncbatchnorm", "layernorm", "groupnorm", "instancenorm", "rmsnorm", "none")
_NORM_ALIASES = {"bn": "batchnorm", "syncbn": "syncbatchnorm", "ln": "layernorm", "gn": "groupnorm",
                 "in": "instancenorm", "batchnorm1d": "batchnorm", "batchnorm2d": "batchnorm",
                 "batchnorm3d": "batchnorm"}

# A document written by ``batchpilot plan`` has all of these keys (its ``caveats`` list marks it).
PLAN_KEYS = frozenset({"caveats", "global_batch", "micro_batch_per_rank"})


MAX_INT = 10**15
"""Upper bound for counts (batches, steps, sizes): keeps every ratio a finite float."""


def _int(minimum: int) -> Callable[[str, Any], int]:
    def parse(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_INT:
            raise BatchpilotError(f"{name} must be an integer from {minimum} to 1e15, got {short_repr(value)}")
        return value

    return parse


def _float(low: float, high: float = math.inf, *, closed_low: bool = False) -> Callable[[str, Any], float]:
    def parse(name: str, value: Any) -> float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads ``1e-3`` (no dot) as a string
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        ok = number is not None and math.isfinite(number) and number < high and (
            number >= low if closed_low else number > low)
        if not ok:
            bound = f"{'>=' if closed_low else '>'} {low:g}" + (f" and < {high:g}" if high < math.inf else "")
            raise BatchpilotError(f"{name} must be a finite number {bound}, got {short_repr(value)}")
        return number  # type: ignore[return-value]

    return parse


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BatchpilotError(f"{name} must be true or false, got {short_repr(value)}")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str, Any], str]:
    def parse(name: str, value: Any) -> str:
        text = value.strip().lower().replace("-", "_") if isinstance(value, str) else None
        if text not in options:
            raise BatchpilotError(f"{name} must be one of {', '.join(options)}, got {short_repr(value)}")
        return text

    return parse


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BatchpilotError(f"{name} must be a non-empty string, got {short_repr(value)}")
    return value.strip()


def _norms(name: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise BatchpilotError(f"{name} must be a name or a list of names from {', '.join(NORMS)}, got {short_repr(value)}")
    out: list[str] = []
    for item in items:
        key = item.strip().lower().replace("_", "").replace("-", "")
        key = _NORM_ALIASES.get(key, key)
        if key not in NORMS:
            raise BatchpilotError(f"{name} entries must be from {', '.join(NORMS)}, got {short_repr(item)}")
        if key not in out:
            out.append(key)
    return tuple(out)


def _texts(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BatchpilotError(f"{name} must be a list of strings, got {short_repr(value)}")
    return tuple(value)


# canonical name -> (parser, aliases, one-line description for the docs)
FIELDS: dict[str, tuple[Callable[[str, Any], Any], tuple[str, ...], str]] = {
    "global_batch": (_int(1), ("batch", "batch_size", "effective_batch"), "samples per optimizer step, all ranks and micro-batches"),
    "micro_batch_per_rank": (_int(1), ("micro_batch", "per_device_train_batch_size"), "samples per forward/backward on one rank"),
    "accumulation_steps": (_int(1), ("gradient_accumulation_steps", "grad_accum"), "micro-batches per optimizer step"),
    "world_size": (_int(1), (), "data-parallel ranks (devices)"),
    "lr": (_float(0.0), ("learning_rate",), "peak LR used at global_batch"),
    "base_batch": (_int(1), (), "batch the base LR was tuned at"),
    "base_lr": (_float(0.0), (), "LR tuned at base_batch"),
    "lr_rule": (_choice(LR_RULES), (), "declared scaling rule: linear, sqrt or none"),
    "warmup_steps": (_int(0), (), "linear warmup length in optimizer steps (0 = none)"),
    "optimizer": (_text, (), "optimizer class name: sgd, adamw, lamb ..."),
    "scheduler_step": (_choice(STEP_WHEN), (), "when scheduler.step() runs"),
    "ema_step": (_choice(STEP_WHEN), (), "when the EMA of the weights updates (absent: no EMA)"),
    "ema_decay": (_float(0.0, 1.0), (), "EMA decay per update"),
    "zero_grad": (_choice(STEP_WHEN), (), "when optimizer.zero_grad() runs"),
    "loss_scaled_by_accumulation": (_bool, (), "each micro-batch's mean loss is divided by accumulation_steps (or sum/units is used)"),
    "normalization": (_norms, ("norm",), "normalization layers in the model"),
    "sync_bn": (_bool, (), "BatchNorm converted to SyncBatchNorm"),
    "parallel": (_choice(PARALLEL), (), "data parallelism: none, dp (nn.DataParallel), ddp, fsdp"),
    "finetune": (_bool, (), "fine-tuning a pre-trained model"),
    "pretrain_batch": (_int(1), (), "batch used in pre-training"),
    "pretrain_lr": (_float(0.0), (), "peak LR used in pre-training"),
    "validated": (_bool, (), "held-out metric checked at this global batch and LR"),
    "throughput_measured": (_bool, (), "samples/s (or time to target) measured at this batch"),
    "batch_source": (_choice(BATCH_SOURCES), (), "how the batch was chosen: tuned, paper, max_fit, plan, sweep"),
    "max_micro_batch": (_int(1), (), "largest micro-batch per rank that fits in memory (measured)"),
    "noise_scale": (_float(0.0), ("critical_batch",), "measured gradient noise scale B_noise (~ critical batch)"),
    "dataset_size": (_int(1), (), "training samples per epoch"),
    "drop_last": (_bool, (), "the loader drops the ragged last batch"),
    "caveats": (_texts, (), "caveats written by batchpilot plan"),
    "workload": (_text, (), "built-in workload: fills base_batch, base_lr, optimizer, normalization (file.py:fn is never imported)"),
}

_ALIASES: dict[str, str] = {a: name for name, (_, aliases, _) in FIELDS.items() for a in aliases}


@dataclass(frozen=True)
class DoctorConfig:
    """A validated training config, plan or live-object summary; ``None`` = not given.

    ``kind`` is ``config``, ``plan`` or ``live``; ``unknown`` holds keys that are not
    schema fields (reported as ``BP001`` for configs, ignored for plans).
    See :data:`FIELDS` for the meaning of each field.
    """

    kind: str = "config"
    unknown: tuple[str, ...] = ()
    global_batch: int | None = None
    micro_batch_per_rank: int | None = None
    accumulation_steps: int | None = None
    world_size: int | None = None
    lr: float | None = None
    base_batch: int | None = None
    base_lr: float | None = None
    lr_rule: str | None = None
    warmup_steps: int | None = None
    optimizer: str | None = None
    scheduler_step: str | None = None
    ema_step: str | None = None
    ema_decay: float | None = None
    zero_grad: str | None = None
    loss_scaled_by_accumulation: bool | None = None
    normalization: tuple[str, ...] | None = None
    sync_bn: bool | None = None
    parallel: str | None = None
    finetune: bool | None = None
    pretrain_batch: int | None = None
    pretrain_lr: float | None = None
    validated: bool | None = None
    throughput_measured: bool | None = None
    batch_source: str | None = None
    max_micro_batch: int | None = None
    noise_scale: float | None = None
    dataset_size: int | None = None
    drop_last: bool | None = None
    caveats: tuple[str, ...] | None = None
    workload: str | None = None

    @property
    def optimizer_family(self) -> str | None:
        """The optimizer name in lower case, without separators (``AdamW`` -> ``adamw``)."""
        return self.optimizer.lower().replace("_", "").replace("-", "") if self.optimizer else None

    @property
    def has_batchnorm(self) -> bool:
        """Whether the model has (unsynchronised or synchronised) BatchNorm layers."""
        return bool(self.normalization) and bool({"batchnorm", "syncbatchnorm"} & set(self.normalization))

    @property
    def bn_synced(self) -> bool:
        """BatchNorm statistics are synchronised across ranks."""
        return bool(self.sync_bn) or (bool(self.normalization) and "syncbatchnorm" in self.normalization
                                      and "batchnorm" not in self.normalization)


FIELD_NAMES = tuple(f.name for f in fields(DoctorConfig) if f.name not in ("kind", "unknown"))
assert set(FIELD_NAMES) == set(FIELDS), "FIELDS and DoctorConfig disagree"


def is_plan(data: Mapping[str, Any]) -> bool:
    """Whether a mapping looks like a ``batchpilot plan`` output (a ``caveats`` list next to the batch keys)."""
    return PLAN_KEYS <= set(data)


def parse_config(data: Any, kind: str | None = None) -> DoctorConfig:
    """Validate a mapping of config fields into a :class:`DoctorConfig`.

    Args:
        data: the parsed config (a mapping of field names or aliases to values).
        kind: ``config``, ``plan`` or ``live``; ``None`` detects a plan by its keys.

    Raises:
        BatchpilotError: not a mapping, a field given twice (name and alias), or a
            value of the wrong type or out of range.
    """
    if not isinstance(data, Mapping):
        raise BatchpilotError(f"config must be a mapping of field names to values, got {type(data).__name__}")
    if kind is None:
        kind = "plan" if is_plan(data) else "config"
    values: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    unknown: list[str] = []
    for key, value in data.items():
        if not isinstance(key, str):
            raise BatchpilotError(f"config keys must be strings, got {short_repr(key)}")
        name = key if key in FIELDS else _ALIASES.get(key)
        if name is None:
            unknown.append(key)
            continue
        if value is None:  # null = not given (a plan writes null for what it could not measure)
            continue
        parsed = FIELDS[name][0](key, value)
        if name in values and values[name] != parsed:
            raise BatchpilotError(f"{name} given twice with different values: {given_as[name]}={short_repr(values[name])} and {key}={short_repr(parsed)}")
        values[name] = parsed
        given_as[name] = key
    if kind == "plan":
        values.setdefault("batch_source", "plan")
        values.setdefault("throughput_measured", True)
    return DoctorConfig(kind=kind, unknown=tuple(unknown) if kind == "config" else (), **values)
