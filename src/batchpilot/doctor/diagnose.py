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


def fill_from_workload(cfg: DoctorConfig) -> DoctorConfig:
    """Fill base_batch, base_lr, optimizer and normalization from ``cfg.workload`` where not given.

    Raises:
        BatchpilotError: the workload name or path does not resolve.
    """
    if not cfg.workload:
        return cfg
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
        extra["normalization"] = normalization_of(wl.make_model())
    return dataclasses.replace(cfg, **extra)


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
