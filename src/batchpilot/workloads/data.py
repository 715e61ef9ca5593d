"""Batches with exact epoch semantics, resumable from a checkpoint.

:class:`EpochBatchSampler` hands out global batches of any size (the size may change
between calls, for batch-size schedules). Every sample appears once per epoch; the
last batch of an epoch is ragged rather than dropped, and the trainer weights it by
its true size. The order is a pure function of ``(seed, epoch)``, and the position is
``(epoch, offset)``, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from batchpilot.errors import BatchpilotError


@dataclass
class EpochBatchSampler:
    """Resizable, resumable sampler over ``num_samples`` indices.

    Attributes:
        num_samples: dataset size.
        seed: the order of epoch ``e`` is ``randperm(num_samples)`` under seed ``seed + e``.
        epoch: current epoch (0-based).
        offset: samples of the current epoch already handed out.
    """

    num_samples: int
    seed: int = 0
    epoch: int = 0
    offset: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise BatchpilotError(f"dataset must have at least one sample, got {self.num_samples}")
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _order(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.num_samples, generator=g)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """Indices of the next batch: at most ``batch_size``, fewer at the end of an epoch."""
        if batch_size < 1:
            raise BatchpilotError(f"batch size must be >= 1, got {batch_size}")
        if batch_size > self.num_samples:
            raise BatchpilotError(f"batch {batch_size} is larger than the dataset ({self.num_samples} samples)")
        idx = self._order()[self.offset : self.offset + batch_size]
        self.offset += len(idx)
        if self.offset >= self.num_samples:
            self.epoch += 1
            self.offset = 0
        return idx

    @property
    def epochs_done(self) -> float:
        """Fractional epochs consumed."""
        return self.epoch + self.offset / self.num_samples

    def state_dict(self) -> dict[str, int]:
        """Position and seed, for a checkpoint."""
        return {"num_samples": self.num_samples, "seed": self.seed, "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position saved by :meth:`state_dict` (the dataset size must match)."""
        if int(state["num_samples"]) != self.num_samples:
            raise BatchpilotError(
                f"checkpoint was made on {state['num_samples']} samples, this dataset has {self.num_samples}"
            )
        self.seed, self.epoch, self.offset = int(state["seed"]), int(state["epoch"]), int(state["offset"])


def fetch(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``(inputs, targets)`` for ``indices``; fast path for ``TensorDataset``."""
    if isinstance(dataset, TensorDataset):
        x, y = (t[indices] for t in dataset.tensors[:2])
        return x, y
    batch = default_collate([dataset[int(i)] for i in indices])
    return batch[0], batch[1]


def split_micro(indices: torch.Tensor, micro_batch: int) -> list[torch.Tensor]:
    """Split a global batch's indices into micro-batches of ``micro_batch`` (the last may be ragged)."""
    return list(torch.split(indices, micro_batch))
