"""Bench workload (a): MNIST-1D with its 40 positions shuffled, an MLP with LayerNorm, AdamW.

A variant of the built-in ``mnist1d-mlp`` that differs in data, normalisation and optimizer: the
MNIST-1D generator with its own seed (7, not the built-ins' 42), every signal's 40 positions
permuted by one fixed permutation (no locality left: only a fully connected model can use it),
LayerNorm after each hidden layer, and AdamW (square-root LR scaling). Generated offline by the
``mnist1d`` package through batchpilot's cached generator; no download.

Load with ``bench/workloads/mnist1d_shuffled_ln.py:make_workload``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.workloads import Workload
from batchpilot.workloads.common import correct_sum, cross_entropy_sum
from batchpilot.workloads.mnist1d import NUM_CLASSES, SEQ_LEN, mnist1d_datasets
from batchpilot.workloads.spec import Target

NAME = "mnist1d-shuffled-ln-adamw"
BASE_BATCH, BASE_LR = 32, 1e-3
TARGET = Target("val_acc", ">=", 0.7)


def _shuffled(num_train: int, num_val: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    train, val = mnist1d_datasets(num_train, num_val, seed=seed)
    perm = torch.randperm(SEQ_LEN, generator=torch.Generator().manual_seed(1234))  # own generator: global RNG untouched
    (x, y), (xv, yv) = train.tensors, val.tensors
    return TensorDataset(x[:, perm].contiguous(), y), TensorDataset(xv[:, perm].contiguous(), yv)


class LNMLP(nn.Module):
    """Three linear layers; LayerNorm and ReLU after each hidden one."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(SEQ_LEN, hidden), nn.LayerNorm(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _adamw(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)


def make_workload(num_train: int = 8000, num_val: int = 1000, seed: int = 7) -> Workload:
    """MNIST-1D (generator seed ``seed``), positions shuffled; LayerNorm MLP, AdamW."""
    train, val = _shuffled(num_train, num_val, seed)
    return Workload(
        name=NAME, make_model=LNMLP, train_data=train, val_data=val,
        loss_sum=cross_entropy_sum, metric_sum=correct_sum, metric_name="val_acc",
        make_optimizer=_adamw, base_batch=BASE_BATCH, base_lr=BASE_LR, target=TARGET,
        description=f"MNIST-1D (seed {seed}) with shuffled positions, LayerNorm MLP, AdamW; base batch {BASE_BATCH}, "
                    f"LR {BASE_LR:g}; target {TARGET}",
    )
