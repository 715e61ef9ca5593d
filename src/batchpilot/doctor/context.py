"""Batch geometry derived from a config: global batch, micro-batch, accumulation, world size.

``global_batch = micro_batch_per_rank x accumulation_steps x world_size``. Whatever
two of the three batch numbers a config gives, the third is derived; a set that does
not divide is reported (``BP101``) and the given values are kept, never "fixed".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchpilot.doctor.catalog import RULES
from batchpilot.doctor.findings import Finding
from batchpilot.doctor.schema import DoctorConfig

REL_TOL = 0.02
"""Relative tolerance when comparing LRs: 2% absorbs rounding such as 2.83e-3 for 1e-3 x sqrt(8)."""


def close(a: float, b: float, rel_tol: float = REL_TOL) -> bool:
    """Whether two positive numbers agree to ``rel_tol``."""
    return math.isclose(a, b, rel_tol=rel_tol)


def fmt(x: float | int | None) -> str:
    """A number for a message: ints as is, floats to 4 significant digits."""
    if x is None:
        return "?"
    if isinstance(x, int):
        return str(x)
    return f"{x:.4g}"


@dataclass(frozen=True)
class Context:
    """A config plus its derived batch geometry (``None`` where it cannot be known).

    Attributes:
        cfg: the validated config.
        global_batch: samples per optimizer step.
        micro_batch: samples per forward/backward on one rank.
        accumulation: micro-batches per optimizer step.
        world: data-parallel ranks (1 when not given).
        divides: False when the given numbers contradict each other (``BP101``).
    """

    cfg: DoctorConfig
    global_batch: int | None
    micro_batch: int | None
    accumulation: int | None
    world: int
    divides: bool = True

    @property
    def per_rank_batch(self) -> int | None:
        """Samples per optimizer step on one rank (micro-batch x accumulation)."""
        if self.micro_batch is None or self.accumulation is None:
            return None
        return self.micro_batch * self.accumulation

    @property
    def accumulating(self) -> bool:
        """Known to accumulate over more than one micro-batch."""
        return self.accumulation is not None and self.accumulation > 1


def build_context(cfg: DoctorConfig) -> tuple[Context, list[Finding]]:
    """Derive the batch geometry; return it with any ``BP101`` finding."""
    B, m, k, w = cfg.global_batch, cfg.micro_batch_per_rank, cfg.accumulation_steps, cfg.world_size or 1
    rule = RULES["BP101"]
    bad: str | None = None
    if B is not None and m is not None and k is not None:
        if B != m * k * w:
            bad = f"global batch {B} != micro-batch {m} x accumulation {k} x world size {w} = {m * k * w}"
    elif B is not None and B % w:
        bad = f"global batch {B} does not divide over world size {w} (remainder {B % w})"
    elif B is not None and m is not None:
        per_rank = B // w
        if per_rank % m:
            bad = f"micro-batch {m} does not divide the per-rank batch {per_rank} (global {B} / world {w})"
        else:
            k = per_rank // m
    elif B is not None and k is not None:
        if B % (k * w):
            bad = f"global batch {B} does not divide into accumulation {k} x world size {w}"
        else:
            m = B // (k * w)
    elif B is not None:
        m, k = B // w, 1
    elif m is not None:
        k = k if k is not None else 1
        B = m * k * w
    findings: list[Finding] = []
    if bad:
        findings.append(rule.finding(
            "error", bad,
            "choose micro_batch_per_rank x accumulation_steps x world_size == global_batch "
            "(pick a divisor of the per-rank batch; never let the loop round the batch silently)",
            ("global_batch", "micro_batch_per_rank", "accumulation_steps", "world_size")))
    return Context(cfg=cfg, global_batch=B, micro_batch=m, accumulation=k, world=w, divides=not bad), findings
