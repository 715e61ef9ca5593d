"""Glue shared by the Lightning and Hugging Face integrations: the doctor, unit counts, wrappers."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from batchpilot.doctor import Finding, check
from batchpilot.doctor.findings import sort_findings
from batchpilot.errors import BatchpilotError
from batchpilot.integrations.plan import PlanSettings

DOCTOR_MODES = ("warn", "raise", "off")
"""``warn``: report findings as warnings; ``raise``: also stop on an error finding; ``off``: skip."""

NOISE_KEYS = ("b_simple", "b_simple_low", "b_simple_high", "g_sq", "trace_sigma")
"""Fields of :class:`batchpilot.noise.microbatch.NoiseEstimate` that the integrations log."""


def check_mode(doctor: str) -> str:
    """Validate the ``doctor=`` option."""
    if doctor not in DOCTOR_MODES:
        raise BatchpilotError(f"doctor must be one of {', '.join(DOCTOR_MODES)}, got {doctor!r}")
    return doctor


def check_every(every_n_steps: int) -> int:
    """Validate the ``every_n_steps=`` option."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise BatchpilotError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
    return every_n_steps


def unwrap(obj: Any, attr: str) -> Any:
    """The object inside a framework wrapper (accelerate's ``AcceleratedOptimizer.optimizer``, ...)."""
    seen = 0
    while obj is not None and hasattr(obj, attr) and seen < 4 and type(obj).__module__.split(".")[0] in (
            "accelerate", "lightning", "pytorch_lightning", "transformers"):
        obj, seen = getattr(obj, attr), seen + 1
    return obj


def run_doctor(
    *, model: Any, optimizer: Any, scheduler: Any, data_loader: Any, accumulation_steps: int,
    plan: PlanSettings | None, known: Mapping[str, Any], user_fields: Mapping[str, Any] | None,
) -> list[Finding]:
    """:func:`batchpilot.doctor.check` on a framework's live objects.

    ``known`` holds what the framework guarantees (for example that it steps the scheduler once
    per optimizer step); the plan's facts come next and the user's ``doctor_fields`` last, each
    overriding the former.
    """
    fields: dict[str, Any] = dict(known)
    if plan is not None:
        fields.update(plan.doctor_fields())
    fields.update(user_fields or {})
    return check(model, optimizer, scheduler, data_loader, accumulation_steps=accumulation_steps, **fields)


def format_finding(f: Finding) -> str:
    """One line per finding, for a warning or a log record."""
    return f"batchpilot doctor {f.code} ({f.severity}): {f.message}. Fix: {f.fix}"


def report_findings(findings: list[Finding], mode: str, warn: Callable[[str], None], info: Callable[[str], None]) -> None:
    """Send errors and warnings to ``warn``, notes to ``info``; with ``mode="raise"`` stop on errors."""
    items = sort_findings(findings)
    for f in items:
        (warn if f.severity in ("error", "warning") else info)(format_finding(f))
    errors = [f.code for f in items if f.severity == "error"]
    if mode == "raise" and errors:
        raise BatchpilotError(f"batchpilot doctor found error(s) {', '.join(errors)} at the start of training "
                              "(see the warnings above; doctor='warn' reports without stopping)")


def count_samples(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (tensors, tuples, lists, dicts)."""
    stack = [batch]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            if item.dim() == 0:
                break
            return int(item.shape[0])
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    raise BatchpilotError(
        f"cannot count the samples of a {type(batch).__name__} batch: pass count_units=fn(batch) -> int")


def noise_logs(estimate: Any, prefix: str) -> dict[str, float]:
    """The finite fields of a noise estimate, as ``{prefix + name: value}``."""
    out: dict[str, float] = {}
    for key in NOISE_KEYS:
        value = float(getattr(estimate, key))
        if value == value and abs(value) != float("inf"):
            out[prefix + key] = value
    return out
