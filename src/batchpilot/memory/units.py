"""Byte sizes: parse ``"24GiB"`` / ``"16GB"`` / ``"512MiB"`` and format bytes for people."""

from __future__ import annotations

import math
import re

from batchpilot.errors import BatchpilotError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str | int | float) -> int:
    """Parse a memory size into bytes.

    ``"24GiB"`` and ``"24G"`` are binary (2**30); ``"16GB"`` is decimal (10**9), as GPU
    vendors write it; a bare number is bytes.

    Raises:
        BatchpilotError: for anything that is not a positive size.
    """
    if isinstance(text, bool):
        raise BatchpilotError(f"memory size must look like '24GiB', '16GB' or '512MiB', got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = _SIZE_RE.match(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise BatchpilotError(f"memory size must look like '24GiB', '16GB' or '512MiB', got {text!r}")
        value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value * _UNITS[unit]):  # a finite but huge size is fine: the max batch is capped
        raise BatchpilotError(f"memory size must be a finite number of bytes, got {text!r}")
    nbytes = int(value * _UNITS[unit])
    if nbytes < 1:
        raise BatchpilotError(f"memory size must be positive, got {text!r}")
    return nbytes


def format_bytes(nbytes: float) -> str:
    """``1536 -> '1.50 KiB'``; binary units, three significant digits."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            break
        value /= 1024
    if unit == "GiB" and abs(value) >= 1024:
        return f"{value / 1024:.2f} TiB"
    return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"
