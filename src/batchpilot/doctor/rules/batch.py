"""Batch-size and accumulation checks: BP102-BP107."""

from __future__ import annotations

from typing import Iterator

from batchpilot.doctor.catalog import RULES
from batchpilot.doctor.context import Context
from batchpilot.doctor.findings import Finding
from batchpilot.scaling.lr_rules import ADAPTIVE_OPTIMIZERS

LONG_ACCUMULATION = 16
"""The seed's pitfall 7 threshold; above it the doctor only notes the wall-clock cost."""


def _largest_divisor_at_most(n: int, limit: int, floor: int) -> int:
    """The largest divisor of ``n`` in ``(floor, limit]``, or ``floor`` (bounded search)."""
    top = min(n, limit)
    for d in range(top, max(floor, top - 100_000), -1):
        if n % d == 0:
            return d
    return floor


def max_fit(ctx: Context) -> Iterator[Finding]:
    """BP102 (largest batch that fits used as the batch) and BP103 (micro-batch too large)."""
    cfg, m, k = ctx.cfg, ctx.micro_batch, ctx.accumulation
    cap = cfg.max_micro_batch
    if cap is not None and m is not None and m > cap:
        yield RULES["BP103"].finding(
            "error", f"micro_batch_per_rank {m} exceeds the measured max_micro_batch {cap}",
            f"use micro_batch_per_rank <= {cap} and raise accumulation_steps to keep the global batch",
            ("micro_batch_per_rank", "max_micro_batch"))
        return
    at_cap = cap is not None and m is not None and k == 1 and m >= cap and cfg.batch_source not in ("plan", "sweep", "tuned")
    if cfg.batch_source == "max_fit" or at_cap:
        what = (f"micro_batch_per_rank {m} is the measured max_micro_batch {cap} with no accumulation"
                if at_cap else f"batch_source is max_fit (global batch {ctx.global_batch or '?'})")
        if cfg.finetune:
            what += " while fine-tuning"
        yield RULES["BP102"].finding(
            "warning", f"{what}: the batch was chosen because it fits, not because it is fastest to the target",
            "choose the batch by measured time to target (batchpilot plan), keep a memory margin "
            "(the seed suggests ~80% of the max), and validate the held-out metric at that batch",
            ("micro_batch_per_rank", "max_micro_batch", "batch_source"))


def accumulation(ctx: Context) -> Iterator[Finding]:
    """BP104 (accumulation not needed), BP105 (loss not scaled), BP106 (long accumulation), BP107 (ragged)."""
    cfg, m, k = ctx.cfg, ctx.micro_batch, ctx.accumulation
    if not ctx.accumulating or m is None or k is None:
        return
    per_rank = m * k
    cap = cfg.max_micro_batch
    if cap is not None and m <= cap:
        best = _largest_divisor_at_most(per_rank, cap, m)
        if best > m:
            yield RULES["BP104"].finding(
                "info",
                f"accumulation_steps {k} x micro-batch {m}, but micro-batch {best} fits (max_micro_batch {cap}): "
                f"accumulation {per_rank // best} gives the same gradient{' (BN aside)' if cfg.has_batchnorm else ''} "
                f"with {k - per_rank // best} fewer sequential passes per step",
                f"set micro_batch_per_rank {best} and accumulation_steps {per_rank // best}; measure samples/s to confirm",
                ("micro_batch_per_rank", "accumulation_steps", "max_micro_batch"))
    if cfg.loss_scaled_by_accumulation is False:
        adaptive = cfg.optimizer_family in ADAPTIVE_OPTIMIZERS
        yield RULES["BP105"].finding(
            "warning" if adaptive else "error",
            f"loss_scaled_by_accumulation is false with accumulation_steps {k}: the gradient is {k}x the batch mean"
            + (f" (with {cfg.optimizer}, clipping and eps see the {k}x scale)" if adaptive
               else f", so the effective LR is {k}x the configured one"),
            f"divide each micro-batch's mean loss by {k} (or sum the loss and divide by the units in the whole batch)",
            ("loss_scaled_by_accumulation", "accumulation_steps"))
    if k > LONG_ACCUMULATION:
        yield RULES["BP106"].finding(
            "info",
            f"accumulation_steps {k}: exact (parameters do not change between micro-batches), but each optimizer step "
            f"runs {k} forward/backward passes one after another",
            "nothing to fix for correctness; if the step time matters, use a larger micro-batch or more ranks",
            ("accumulation_steps",))
    B = ctx.global_batch
    if B is not None and cfg.dataset_size is not None and cfg.drop_last is not True and cfg.dataset_size % B:
        rest = cfg.dataset_size % B
        yield RULES["BP107"].finding(
            "info",
            f"dataset_size {cfg.dataset_size} is not a multiple of global batch {B}: the last step of each epoch has "
            f"{rest} samples, split unevenly over {k} micro-batches",
            "set drop_last: true, or normalise the loss by the units of the whole batch "
            "(sum over samples / samples per step), as batchpilot's accumulate_gradients does",
            ("dataset_size", "drop_last", "global_batch"))
