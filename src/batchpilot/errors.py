"""User-facing errors.

Every error caused by bad input raises :class:`BatchpilotError` (a ``ValueError``)
with a one-line message naming the value and what was expected. The CLI turns it
into that line on stderr and exit code :data:`EXIT_USAGE`.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

EXIT_OK = 0
"""The command succeeded."""
EXIT_FINDINGS = 1
"""The command ran but found errors (for example ``doctor`` findings)."""
EXIT_USAGE = 2
"""Bad input: a one-line error was printed."""
EXIT_DIVERGED = 3
"""Training diverged (non-finite or exploding loss); the summary says ``status: diverged``."""
EXIT_INTERRUPTED = 130
"""Interrupted by the user; a checkpoint was written so ``--resume`` continues."""


class BatchpilotError(ValueError):
    """Bad input from the user: the message names the value and what was expected."""


def require_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int >= 1, else raise a clear :class:`BatchpilotError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BatchpilotError(f"{name} must be a positive integer, got {short_repr(value)}")
    return value


def require_non_negative(name: str, value: float) -> float:
    """Return ``value`` if it is a finite number >= 0, else raise :class:`BatchpilotError`."""
    if not isinstance(value, (int, float)) or value != value or value < 0 or value == float("inf"):
        raise BatchpilotError(f"{name} must be a finite number >= 0, got {short_repr(value)}")
    return float(value)


_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlevel = 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def short_repr(value: Any) -> str:
    """A bounded, one-line ``repr`` for error messages (huge strings, numbers and nests stay short)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    if isinstance(value, float) and math.isfinite(value) and abs(value) > 1e300:
        return f"{value:.3g}"
    try:
        text = _REPR.repr(value)
    except Exception:  # an exotic object whose repr fails
        text = f"<{type(value).__name__}>"
    return " ".join(text.split())
