"""Atomic checkpoints that load with ``weights_only=True``.

A checkpoint holds everything needed for a bit-identical resume: model, optimizer,
scheduler, EMA, torch RNG, the sampler position and the run's counters. It is
written to a temporary file and renamed, so a crash mid-write never leaves a
half-written checkpoint in place of a good one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)
