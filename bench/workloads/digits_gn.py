"""Bench workload (c): scikit-learn's bundled 8x8 digits, a small CNN with GroupNorm, SGD+momentum.

The GroupNorm counterpart of the built-in ``digits-cnn-bn``: no batch-coupled layer, so gradient
accumulation is exact. The digits ship with scikit-learn (no download); a fixed permutation of its
own generator splits them (1,397 train, 400 validate), and the training images are augmented
offline with their four one-pixel shifts (up, down, left, right; zero fill), so 6,985 train.
Linear LR scaling (SGD).

Load with ``bench/workloads/digits_gn.py:make_workload``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.workloads import Workload
from batchpilot.workloads.common import correct_sum, cross_entropy_sum
from batchpilot.workloads.spec import Target

NAME = "digits-cnn-gn-sgd"
BASE_BATCH, BASE_LR = 32, 0.05
TARGET = Target("val_acc", ">=", 0.98)


@lru_cache(maxsize=1)
def _load() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    return x[perm], y[perm]


class GNCNN(nn.Module):
    """Two 3x3 conv blocks with GroupNorm (4 channels per group), average pooling, a linear head."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.GroupNorm(channels // 4, channels), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.GroupNorm(channels // 2, 2 * channels), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * channels, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _sgd(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def shifted(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, 1, 8, 8) and its four one-pixel shifts, zero filled: (5N, 1, 8, 8)."""
    out = [x]
    for dim, step in ((2, 1), (2, -1), (3, 1), (3, -1)):
        s = torch.roll(x, step, dims=dim)
        edge = 0 if step > 0 else -1
        s.select(dim, edge).zero_()
        out.append(s)
    return torch.cat(out)


def make_workload(num_val: int = 400) -> Workload:
    """Digits (1,797 images): all but the last ``num_val`` of the fixed permutation train (with their shifts)."""
    x, y = _load()
    n = len(y) - num_val
    return Workload(
        name=NAME, make_model=GNCNN,
        train_data=TensorDataset(shifted(x[:n]), y[:n].repeat(5)),
        val_data=TensorDataset(x[n:].clone(), y[n:].clone()),
        loss_sum=cross_entropy_sum, metric_sum=correct_sum, metric_name="val_acc",
        make_optimizer=_sgd, base_batch=BASE_BATCH, base_lr=BASE_LR, target=TARGET,
        description=f"sklearn digits (+ 1-pixel shifts), CNN with GroupNorm, SGD+momentum; base batch {BASE_BATCH}, LR {BASE_LR:g}; "
                    f"target {TARGET}",
    )
