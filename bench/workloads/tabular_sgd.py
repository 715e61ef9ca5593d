"""Bench workload (b): 10-class tabular data from scikit-learn's ``make_classification``, an MLP, SGD+momentum.

12,000 samples of 40 features (16 informative, 8 redundant linear combinations, 16 noise), two
Gaussian clusters per class and 2 % of the labels flipped, generated with a fixed ``random_state``
(no download); features standardised with the training split's mean and deviation. The last
2,000 samples validate. SGD with momentum: linear LR scaling.

Load with ``bench/workloads/tabular_sgd.py:make_workload``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.workloads import Workload
from batchpilot.workloads.common import correct_sum, cross_entropy_sum
from batchpilot.workloads.spec import Target

NAME = "tabular10-mlp-sgd"
NUM_FEATURES, NUM_CLASSES = 40, 10
BASE_BATCH, BASE_LR = 64, 0.05
TARGET = Target("val_acc", ">=", 0.86)


@lru_cache(maxsize=2)
def _data(num_samples: int, random_state: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=num_samples, n_features=NUM_FEATURES, n_informative=16, n_redundant=8, n_repeated=0,
        n_classes=NUM_CLASSES, n_clusters_per_class=2, class_sep=1.0, flip_y=0.02, random_state=random_state,
    )
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)


class TabularMLP(nn.Module):
    """Two hidden ReLU layers."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _sgd(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def make_workload(num_train: int = 40_000, num_val: int = 5_000, random_state: int = 0) -> Workload:
    """``make_classification`` data: the first ``num_train`` samples train, the next ``num_val`` validate."""
    x, y = _data(num_train + num_val, random_state)
    mean, std = x[:num_train].mean(0), x[:num_train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    return Workload(
        name=NAME, make_model=TabularMLP,
        train_data=TensorDataset(x[:num_train].clone(), y[:num_train].clone()),
        val_data=TensorDataset(x[num_train:].clone(), y[num_train:].clone()),
        loss_sum=cross_entropy_sum, metric_sum=correct_sum, metric_name="val_acc",
        make_optimizer=_sgd, base_batch=BASE_BATCH, base_lr=BASE_LR, target=TARGET,
        description=f"make_classification (10 classes, 40 features), MLP, SGD+momentum; base batch {BASE_BATCH}, "
                    f"LR {BASE_LR:g}; target {TARGET}",
    )
