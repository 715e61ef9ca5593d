"""Silence what native code prints to the stderr file descriptor.

``torch.profiler`` (Kineto) writes ``USDT ... profiler_start/stop`` lines straight to
fd 2 on every use. The memory predictor profiles small real ops, so without this a
plan prints dozens of such lines. Python-level warnings still reach ``sys.stderr``
after the block.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Point fd 2 at /dev/null for the block, then restore it (no-op if fd 2 is unusable)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
