"""scikit-learn's bundled 8x8 digits with a small CNN that uses BatchNorm.

This is the workload where gradient accumulation is *not* equivalent to one large
batch: BatchNorm computes its statistics per micro-batch (seed 000).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.workloads.spec import Target, Workload, register
from batchpilot.workloads.common import correct_sum, cross_entropy_sum

DESC = "sklearn digits (8x8), CNN with BatchNorm, SGD+momentum; base batch 32, LR 0.05; target val_acc>=0.95"


@lru_cache(maxsize=1)
def _load() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()  # ships with scikit-learn: no download
    x = torch.as_tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.long)
    # A fixed permutation (own generator: the global RNG is untouched) for the split.
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


class BNCNN(nn.Module):
    """Two conv blocks with BatchNorm, then a linear head."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.BatchNorm2d(2 * channels), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * channels, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _sgd(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


@register("digits-cnn-bn", DESC)
def digits_cnn_bn(num_val: int = 297) -> Workload:
    """Digits (1797 images): the first ``1797 - num_val`` train, the rest validate."""
    x, y = _load()
    n_train = len(y) - num_val
    return Workload(
        name="digits-cnn-bn", make_model=BNCNN,
        train_data=TensorDataset(x[:n_train].clone(), y[:n_train].clone()),
        val_data=TensorDataset(x[n_train:].clone(), y[n_train:].clone()),
        loss_sum=cross_entropy_sum, metric_sum=correct_sum, metric_name="val_acc",
        make_optimizer=_sgd, base_batch=32, base_lr=0.05, target=Target("val_acc", ">=", 0.95),
        description=DESC,
    )
