"""The doctor's output: plain-data findings, each with a stable code.

A :class:`Finding` says what is wrong (``message``, with the actual values), why
(``reason``, one line) and on whose authority (``source``), and how to fix it
(``fix``). The catalog of codes is :data:`batchpilot.doctor.catalog.RULES`; the
table in ``docs/doctor.md`` maps every code to the pitfall or red flag of seed 002
it comes from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

from batchpilot.errors import EXIT_FINDINGS, EXIT_OK

SEVERITIES: tuple[str, ...] = ("error", "warning", "info")
"""Severities, most severe first. Only ``error`` makes ``batchpilot doctor`` exit non-zero."""


@dataclass(frozen=True)
class Finding:
    """One problem (or note) the doctor found.

    Attributes:
        code: stable identifier such as ``BP201``; never reused for another meaning.
        severity: ``error`` (the training math is wrong or cannot run), ``warning``
            (likely to cost accuracy or a run; check it) or ``info`` (a note).
        title: the rule's short name.
        message: what was found, with the actual values.
        reason: one line: why it matters.
        source: where the reason comes from (paper, seed section).
        fix: what to change.
        fields: the config fields the finding is about.
    """

    code: str
    severity: str
    title: str
    message: str
    reason: str
    source: str
    fix: str
    fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        d = asdict(self)
        d["fields"] = list(self.fields)
        return d


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Most severe first, then by code (stable for equal keys)."""
    return sorted(findings, key=lambda f: (SEVERITIES.index(f.severity), f.code))


def count_by_severity(findings: Iterable[Finding]) -> dict[str, int]:
    """``{"error": n, "warning": n, "info": n}``."""
    counts = dict.fromkeys(SEVERITIES, 0)
    for f in findings:
        counts[f.severity] += 1
    return counts


def exit_code(findings: Iterable[Finding]) -> int:
    """1 (:data:`EXIT_FINDINGS`) when any finding is an error, else 0."""
    return EXIT_FINDINGS if any(f.severity == "error" for f in findings) else EXIT_OK


def report_dict(findings: Iterable[Finding], source: str | None = None) -> dict[str, Any]:
    """The JSON document ``batchpilot doctor --json`` prints."""
    items = sort_findings(findings)
    return {
        "source": source,
        "ok": exit_code(items) == EXIT_OK,
        "counts": count_by_severity(items),
        "findings": [f.to_dict() for f in items],
    }
