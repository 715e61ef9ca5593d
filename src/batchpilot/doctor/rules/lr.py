"""Learning-rate checks: BP201-BP206.

The expected LR comes from :func:`batchpilot.scaling.lr_rules.scale_lr` with the declared rule
or :func:`batchpilot.scaling.lr_rules.default_lr_rule` for the optimizer (linear for SGD,
Goyal et al. 2017; square root for the Adam family, Malladi et al. 2022).
"""

from __future__ import annotations

import math
from typing import Iterator

from batchpilot.doctor.catalog import RULES
from batchpilot.doctor.context import Context, close, fmt
from batchpilot.doctor.findings import Finding
from batchpilot.scaling.lr_rules import default_lr_rule, scale_lr

WARMUP_WARN_RATIO = 2.0
"""An LR above this multiple of the base LR without warmup is a warning (seed 002's table: 4x 'maybe')."""
WARMUP_ERROR_RATIO = 8.0
"""From this multiple on it is an error (seed 002's table: 8x 'YES', 16x 'CRITICAL')."""

_LR_FIELDS = ("lr", "base_lr", "base_batch", "global_batch")


def rule_in_use(ctx: Context) -> str | None:
    """The declared ``lr_rule``, else the optimizer's default rule, else ``None`` (unknown)."""
    cfg = ctx.cfg
    if cfg.lr_rule:
        return cfg.lr_rule
    return default_lr_rule(cfg.optimizer_family) if cfg.optimizer_family else None


def _scaled(ctx: Context, batch: int, rule: str) -> float:
    cfg = ctx.cfg
    assert cfg.base_lr is not None and cfg.base_batch is not None
    return scale_lr(cfg.base_lr, cfg.base_batch, batch, rule)


def lr_unscaled(ctx: Context) -> bool:
    """Whether the LR is left at (or scaled for) something other than the global batch (BP201/BP204)."""
    return any(f.code in ("BP201", "BP204") for f in scaling(ctx))


def scaling(ctx: Context) -> Iterator[Finding]:
    """BP201 (not rescaled), BP202 (wrong rule), BP203 (off the rule), BP204 (tuned for the micro-batch)."""
    cfg, B = ctx.cfg, ctx.global_batch
    declared, family = cfg.lr_rule, cfg.optimizer_family
    default = default_lr_rule(family) if family else None
    if declared and default and declared not in ("none", default):
        yield RULES["BP202"].finding(
            "warning", f"lr_rule is {declared} but the optimizer is {cfg.optimizer}, whose default rule is {default}",
            f"set lr_rule: {default} (or keep {declared} and confirm it with a sweep)", ("lr_rule", "optimizer"))
    if cfg.lr is None or cfg.base_lr is None or cfg.base_batch is None or B is None or B == cfg.base_batch:
        return
    lr, base_lr, B0 = cfg.lr, cfg.base_lr, cfg.base_batch
    rule = rule_in_use(ctx)
    micro_level = ctx.micro_batch * ctx.world if ctx.accumulating and ctx.micro_batch else None
    change = f"global batch {B} is {fmt(B / B0)}x the base batch {B0}"
    target = f"{fmt(_scaled(ctx, B, rule))} by the {rule} rule" if rule and rule != "none" else "a rescaled LR"
    if micro_level is not None and (micro_level == B0 and close(lr, base_lr) or (
            rule and rule != "none" and micro_level != B and close(lr, _scaled(ctx, micro_level, rule)))):
        yield RULES["BP204"].finding(
            "error",
            f"lr {fmt(lr)} is the LR for batch {micro_level} (micro-batch {ctx.micro_batch} x world {ctx.world}), but "
            f"with accumulation_steps {ctx.accumulation} the optimizer steps on {B}; expected {target}",
            f"scale the LR for the global batch {B}, not the micro-batch: lr = {target}", _LR_FIELDS + ("accumulation_steps",))
        return
    if close(lr, base_lr):
        yield RULES["BP201"].finding(
            "warning" if rule == "none" else "error",
            f"lr {fmt(lr)} equals base_lr tuned at batch {B0}, but {change}; expected {target}"
            + (" (lr_rule: none was declared)" if rule == "none" else ""),
            f"set lr to {target}, with warmup for a large jump" if rule and rule != "none"
            else "set optimizer or lr_rule, then scale lr (linear for SGD, sqrt for Adam)", _LR_FIELDS)
        return
    if not rule or rule == "none":
        return
    expected = _scaled(ctx, B, rule)
    if close(lr, expected):
        return
    for other in ("linear", "sqrt"):
        if other != rule and close(lr, _scaled(ctx, B, other)):
            if declared != other:  # a declared mismatch was reported above
                yield RULES["BP202"].finding(
                    "warning",
                    f"lr {fmt(lr)} is base_lr {fmt(base_lr)} scaled by the {other} rule for {change}, but "
                    f"{cfg.optimizer or 'the declared rule'} calls for {rule}: {fmt(expected)}",
                    f"set lr to {fmt(expected)} (or confirm {fmt(lr)} with a sweep and set validated: true)", _LR_FIELDS + ("optimizer",))
            return
    factor = lr / expected
    far = not 0.5 <= factor <= 2.0
    yield RULES["BP203"].finding(
        "warning" if far and not cfg.validated else "info",
        f"lr {fmt(lr)} is {fmt(factor)}x the {rule}-rule LR {fmt(expected)} for {change}"
        + (" (validated: true)" if cfg.validated else ""),
        f"use lr {fmt(expected)}, or keep {fmt(lr)} if it was tuned at batch {B} and set validated: true", _LR_FIELDS)


def critical_batch(ctx: Context) -> Iterator[Finding]:
    """BP205: the global batch is beyond the measured gradient noise scale (~ critical batch)."""
    cfg, B = ctx.cfg, ctx.global_batch
    if cfg.noise_scale is None or B is None or B <= cfg.noise_scale:
        return
    bn = cfg.noise_scale
    # McCandlish et al. 2018, eq. 2.11: S = S_min (1 + B_noise/B), E = E_min (1 + B/B_noise).
    steps_vs_crit = (1 + bn / B) / 2
    samples_vs_crit = (1 + B / bn) / 2
    yield RULES["BP205"].finding(
        "warning",
        f"global batch {B} is {fmt(B / bn)}x the measured noise scale {fmt(bn)}: predicted {fmt(samples_vs_crit)}x the samples "
        f"of batch {fmt(bn)} for {fmt(steps_vs_crit)}x its steps (McCandlish et al. eq. 2.11)",
        f"use a global batch near {fmt(bn)} (batchpilot plan weighs this against throughput), or validate the LR at {B} with a sweep",
        ("global_batch", "noise_scale"))


def warmup(ctx: Context) -> Iterator[Finding]:
    """BP206: the (scaled) LR is a large multiple of the base LR and there is no warmup."""
    cfg, B = ctx.cfg, ctx.global_batch
    if cfg.warmup_steps != 0 or cfg.base_lr is None:
        return
    rule = rule_in_use(ctx)
    lr, needed = cfg.lr, None
    if cfg.base_batch is not None and B is not None and rule and rule != "none":
        needed = _scaled(ctx, B, rule)
    if lr is not None and needed is not None and lr_unscaled(ctx):
        lr = None  # the LR is wrong (BP201/BP204): judge the warmup by the LR it should have
    peak = lr if lr is not None else needed
    if peak is None:
        return
    ratio = peak / cfg.base_lr
    if not ratio > WARMUP_WARN_RATIO or not math.isfinite(ratio):
        return
    what = f"lr {fmt(peak)}" if lr is not None else f"the scaled lr {fmt(peak)} ({rule} rule for global batch {B})"
    steps_hint = ""
    if cfg.dataset_size is not None and B is not None:
        steps_hint = f"; 5 epochs (Goyal et al.) = {5 * -(-cfg.dataset_size // B)} steps here"
    yield RULES["BP206"].finding(
        "error" if ratio >= WARMUP_ERROR_RATIO else "warning",
        f"{what} is {fmt(ratio)}x base_lr {fmt(cfg.base_lr)} and warmup_steps is 0",
        f"add a linear warmup from a small LR to {fmt(peak)} over a few percent of training{steps_hint}",
        ("warmup_steps", "lr", "base_lr"))
