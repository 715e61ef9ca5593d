"""Run every rule over a config or plan and return the sorted findings."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from batchpilot.doctor.context import build_context
from batchpilot.doctor.findings import Finding, sort_findings
from batchpilot.doctor.load import load_config
from batchpilot.doctor.rules import ALL_RULES
from batchpilot.doctor.schema import DoctorConfig, parse_config
from batchpilot.errors import BatchpilotError


def fill_from_workload(cfg: DoctorConfig) -> DoctorConfig:
    """Fill base_batch, base_lr, optimizer and normalization from ``cfg.workload`` where not given.

    Only a built-in workload is looked up. A config is data: a ``file.py:fn`` or ``pkg.module:fn`` it
    names is never imported (its code would run), so those fields stay unknown and ``BP002`` says so.

    Raises:
        BatchpilotError: a built-in workload that cannot be built.
    """
    if not cfg.workload:
        return cfg
    if not is_builtin_workload(cfg.workload):
        from batchpilot.plan.workload_spec import kind_of

        if kind_of(cfg.workload) == "unknown":  # neither a built-in nor a loader path: a typo
            from batchpilot.errors import short_repr
            from batchpilot.workloads import list_workloads

            raise BatchpilotError(f"unknown workload {short_repr(cfg.workload)}; known: {', '.join(list_workloads())} "
                                  f"(or 'file.py:fn', 'pkg.module:fn', which the doctor does not import)")
        return cfg
    import torch

    from batchpilot.norm import normalization_of
    from batchpilot.workloads import get_workload

    wl = get_workload(cfg.workload)
    extra: dict[str, Any] = {}
    if cfg.base_batch is None:
        extra["base_batch"] = wl.base_batch
    if cfg.base_lr is None:
        extra["base_lr"] = float(wl.base_lr)
    if cfg.optimizer is None:
        extra["optimizer"] = wl.optimizer_family()
    if cfg.normalization is None:
        with torch.random.fork_rng(devices=[]):  # building the model must not move the caller's RNG
            extra["normalization"] = normalization_of(wl.make_model())
    return dataclasses.replace(cfg, **extra)


def is_builtin_workload(name: str) -> bool:
    """Whether ``name`` is a registered built-in workload (no user code, no ``hf:`` model build)."""
    from batchpilot.plan.workload_spec import is_builtin

    return is_builtin(name)


def diagnose(cfg: DoctorConfig) -> list[Finding]:
    """All findings for a validated config, most severe first.

    Args:
        cfg: a :class:`DoctorConfig` (from :func:`parse_config`, :func:`load_config` or the live inspector).

    Returns:
        The findings, sorted by severity then code. Empty means nothing was found.
    """
    cfg = fill_from_workload(cfg)
    ctx, findings = build_context(cfg)
    for rule in ALL_RULES:
        findings.extend(rule(ctx))
    return sort_findings(findings)


def check_config(config: str | Path | Mapping[str, Any], section: str | None = None) -> list[Finding]:
    """Check a config or plan given as a file path or an already parsed mapping.

    Raises:
        BatchpilotError: the file or mapping is malformed (one-line message).
    """
    if isinstance(config, Mapping):
        return diagnose(parse_config(config))
    return diagnose(load_config(config, section))
