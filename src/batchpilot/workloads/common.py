"""Pieces shared by the built-in classification workloads."""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F


def cross_entropy_sum(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the batch (the trainer normalises by the global unit count)."""
    return F.cross_entropy(output, target, reduction="sum")


def correct_sum(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Number of correct top-1 predictions (accuracy = sum / samples)."""
    return (output.argmax(dim=-1) == target).sum()


@contextmanager
def preserved_host_rng() -> Iterator[None]:
    """Run a block that reseeds Python's and NumPy's global RNGs, then put both back.

    Data generators such as ``mnist1d`` call ``np.random.seed``; the user's RNG state must
    not change behind their back.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
