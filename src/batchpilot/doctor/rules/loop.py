"""Accumulation-loop checks: BP601-BP603 (what must happen once per optimizer step)."""

from __future__ import annotations

from typing import Iterator

from batchpilot.doctor.catalog import RULES
from batchpilot.doctor.context import Context, fmt
from batchpilot.doctor.findings import Finding


def per_step_hooks(ctx: Context) -> Iterator[Finding]:
    """EMA, scheduler and zero_grad must run once per optimizer step, not per micro-batch."""
    cfg, k = ctx.cfg, ctx.accumulation
    if k is None or k < 2:
        return  # without accumulation a micro-batch is an optimizer step
    if cfg.ema_step == "per_micro_batch":
        detail = ""
        if cfg.ema_decay is not None:
            eff = cfg.ema_decay ** k
            detail = (f": decay {fmt(cfg.ema_decay)} acts as {fmt(eff)} per optimizer step "
                      f"(horizon ~{fmt(1 / (1 - cfg.ema_decay))} -> ~{fmt(1 / (1 - eff))} steps)")
        yield RULES["BP601"].finding(
            "error", f"ema_step is per_micro_batch with accumulation_steps {k}: the EMA updates {k} times per optimizer step{detail}",
            "update the EMA right after optimizer.step() (once per optimizer step)", ("ema_step", "accumulation_steps"))
    if cfg.scheduler_step == "per_micro_batch":
        detail = f"; warmup_steps {cfg.warmup_steps} ends after {fmt(cfg.warmup_steps / k)} optimizer steps" if cfg.warmup_steps else ""
        yield RULES["BP602"].finding(
            "error",
            f"scheduler_step is per_micro_batch with accumulation_steps {k}: the schedule advances {k}x too fast{detail}, "
            f"and a schedule sized for N steps ends after N/{k}",
            "call scheduler.step() right after optimizer.step(), and size the schedule in optimizer steps",
            ("scheduler_step", "accumulation_steps"))
    if cfg.zero_grad == "per_micro_batch":
        yield RULES["BP603"].finding(
            "error",
            f"zero_grad is per_micro_batch with accumulation_steps {k}: only the last micro-batch "
            f"({ctx.micro_batch if ctx.micro_batch else '?'} samples) reaches optimizer.step(), not {ctx.global_batch if ctx.global_batch else 'the global batch'}",
            "call optimizer.zero_grad() once per optimizer step (after optimizer.step())", ("zero_grad", "accumulation_steps"))
