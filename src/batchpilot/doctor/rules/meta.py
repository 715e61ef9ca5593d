"""Checks about the config itself: BP001 (unknown field) and BP002 (what could not be checked)."""

from __future__ import annotations

import difflib
from typing import Iterator

from batchpilot.doctor.catalog import RULES
from batchpilot.doctor.context import Context
from batchpilot.doctor.findings import Finding
from batchpilot.doctor.schema import _ALIASES, FIELDS
from batchpilot.errors import short_repr


def _builtin(name: str) -> bool:
    from batchpilot.plan.workload_spec import is_builtin

    return is_builtin(name)


MAX_UNKNOWN = 20
"""Unknown keys reported one by one; the rest are counted in one more finding."""


def unknown_fields(ctx: Context) -> Iterator[Finding]:
    """BP001: one finding per unknown key (up to :data:`MAX_UNKNOWN`), with the closest field name."""
    names = list(FIELDS) + list(_ALIASES)
    unknown = ctx.cfg.unknown
    for key in unknown[:MAX_UNKNOWN]:
        guess = difflib.get_close_matches(key, names, n=1, cutoff=0.75) if len(key) <= 100 else []
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        yield RULES["BP001"].finding(
            "info", f"unknown field {short_repr(key)} is ignored{hint}",
            f"rename it to {guess[0]!r}" if guess else "remove it, or see docs/doctor.md for the field names",
            (key[:100],))
    if len(unknown) > MAX_UNKNOWN:
        yield RULES["BP001"].finding(
            "info", f"{len(unknown) - MAX_UNKNOWN} more unknown fields are ignored",
            "remove them, or see docs/doctor.md for the field names", ())


def not_checked(ctx: Context) -> Iterator[Finding]:
    """BP002: the checks that were skipped, and the fields that would enable them."""
    cfg = ctx.cfg
    gaps: list[str] = []

    def need(label: str, missing: list[str]) -> None:
        if missing:
            gaps.append(f"{label} (give {', '.join(missing)})")

    need("batch geometry", [] if ctx.global_batch is not None else ["global_batch or micro_batch_per_rank"])
    lr_missing = [n for n in ("lr", "base_lr", "base_batch") if getattr(cfg, n) is None]
    need("LR scaling BP201-BP204", lr_missing)
    if not lr_missing and cfg.optimizer is None and cfg.lr_rule is None:
        need("LR rule BP202/BP203", ["optimizer or lr_rule"])
    if cfg.warmup_steps is None:
        need("warmup BP206", ["warmup_steps"])
    if cfg.normalization is None:
        need("BatchNorm BP501-BP504", ["normalization"])
    # a plan runs under batchpilot train, which steps scheduler, EMA and zero_grad per optimizer step
    if cfg.kind != "plan" and (ctx.accumulation is None or ctx.accumulating):
        loop = [n for n in ("scheduler_step", "zero_grad") if getattr(cfg, n) is None]
        if cfg.ema_decay is not None and cfg.ema_step is None:
            loop.append("ema_step")
        if ctx.accumulating and cfg.loss_scaled_by_accumulation is None:
            loop.append("loss_scaled_by_accumulation")
        if ctx.accumulation is None:
            loop.insert(0, "accumulation_steps")
        need("accumulation loop BP105/BP601-BP603", loop)
    if cfg.max_micro_batch is None and cfg.batch_source is None:
        need("largest-batch-that-fits BP102-BP104", ["max_micro_batch or batch_source"])
    if cfg.finetune:
        need("fine-tuning BP301-BP302", [n for n in ("pretrain_batch", "pretrain_lr") if getattr(cfg, n) is None])
    if cfg.workload and gaps and not _builtin(cfg.workload):
        gaps.append(f"workload {short_repr(cfg.workload)} was not imported (the doctor runs no code named in a "
                    f"config; give base_batch, base_lr, optimizer and normalization)")
    if gaps:
        yield RULES["BP002"].finding(
            "info", "not checked: " + "; ".join(gaps),
            "add the missing fields (docs/doctor.md lists them) to run those checks",
            ())
