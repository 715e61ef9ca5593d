"""Atomic checkpoints that load with ``weights_only=True``.

A checkpoint holds everything needed for a bit-identical resume: model, optimizer,
scheduler, EMA, torch RNG, the sampler position and the run's counters. It is
written through :func:`batchpilot.files.atomic_torch_save` (a fresh temporary file,
fsync, rename), so a crash mid-write never leaves a half-written checkpoint in place
of a good one. Loading checks that the file is one: an empty, truncated or foreign
file is a one-line :class:`~batchpilot.errors.BatchpilotError`, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.files import atomic_torch_save

CHECKPOINT_NAME = "checkpoint.pt"
REQUIRED_KEYS = ("config", "workload", "model", "optimizer", "scheduler", "sampler", "rng_cpu", "counters")
"""What every batchpilot checkpoint holds (``ema``, ``batching`` and others may be ``None`` or absent)."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path, state)


def _one_line(exc: BaseException) -> str:
    import pickle

    if isinstance(exc, pickle.UnpicklingError):  # torch's text is paragraphs long and suggests weights_only=False
        return f"{type(exc).__name__}: it holds objects other than tensors and plain data, which are not unpickled"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``.

    Raises:
        BatchpilotError: the file is missing, empty, truncated, not a torch file, or a torch file
            that is not a batchpilot checkpoint (the message names the file and what to do).
    """
    import torch

    path = Path(path)
    hint = "move it away (or drop --resume) to start fresh"
    if path.exists() and not path.is_file():
        raise BatchpilotError(f"checkpoint {str(path)!r} is not a file; {hint}")
    if not path.is_file():
        raise BatchpilotError(f"checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise BatchpilotError(f"checkpoint {str(path)!r} is empty (0 bytes), expected a batchpilot checkpoint; {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage, a pickle of arbitrary objects ...
        raise BatchpilotError(f"checkpoint {str(path)!r} cannot be read ({_one_line(exc)}): it is truncated or "
                              f"not a batchpilot checkpoint; {hint}") from None
    if not isinstance(state, dict):
        raise BatchpilotError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, expected a batchpilot "
                              f"checkpoint (a dict with {', '.join(REQUIRED_KEYS)}); {hint}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise BatchpilotError(f"checkpoint {str(path)!r} is not a batchpilot checkpoint (it lacks "
                              f"{', '.join(missing)}); {hint}")
    return state
