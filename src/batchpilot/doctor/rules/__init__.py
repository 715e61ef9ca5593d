"""All doctor rules: each is a function ``Context -> Iterator[Finding]``, pure and independent."""

from __future__ import annotations

from typing import Callable, Iterator

from batchpilot.doctor.context import Context
from batchpilot.doctor.findings import Finding
from batchpilot.doctor.rules import batch, loop, lr, meta, norm, process

RuleFn = Callable[[Context], Iterator[Finding]]

ALL_RULES: tuple[RuleFn, ...] = (
    meta.unknown_fields,
    batch.max_fit,
    batch.accumulation,
    lr.scaling,
    lr.critical_batch,
    lr.warmup,
    process.finetune,
    process.validation,
    norm.batchnorm,
    loop.per_step_hooks,
    process.caveats,
    meta.not_checked,
)
"""The rules in the order they run (the output is re-sorted by severity and code)."""

__all__ = ["ALL_RULES", "RuleFn"]
