"""The command line a report came from, shown on the page (no heavy imports: the CLI sets it at start-up)."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Sequence

_command: str | None = None


def set_command(argv: Sequence[str] | None) -> None:
    """Record the ``batchpilot`` arguments of this process (``None`` forgets them)."""
    global _command
    _command = None if argv is None else shlex.join(["batchpilot", *map(str, argv)])


def current_command() -> str:
    """``batchpilot ...`` as the CLI was called, else this process's own command line."""
    if _command is not None:
        return _command
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    if prog == "batchpilot" or sys.argv[0].endswith(os.path.join("batchpilot", "__main__.py")):
        return shlex.join(["batchpilot", *sys.argv[1:]])
    return "(from Python) " + shlex.join([prog, *sys.argv[1:]])
