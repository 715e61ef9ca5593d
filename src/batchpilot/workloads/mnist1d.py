"""MNIST-1D (Greydanus 2020), generated offline by the ``mnist1d`` package.

Two models: a 3-layer MLP and a small 1-D CNN. The data is generated (never
downloaded) with the package's own generator and a fixed seed, so every run sees
the same split.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.errors import BatchpilotError
from batchpilot.files import atomic_torch_save
from batchpilot.workloads.spec import Target, Workload, register
from batchpilot.workloads.common import correct_sum, cross_entropy_sum, preserved_host_rng

SEQ_LEN = 40
NUM_CLASSES = 10


def _cache_path(num_train: int, num_val: int, seed: int) -> Path:
    root = Path(os.environ.get("BATCHPILOT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "batchpilot")
    return root / f"mnist1d-{num_train}-{num_val}-{seed}-v1.pt"


@lru_cache(maxsize=4)
def _generate(num_train: int, num_val: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Generate once (seconds), then reuse from the in-process and on-disk caches."""
    path = _cache_path(num_train, num_val, seed)
    try:
        return tuple(torch.load(path, weights_only=True))
    except Exception:  # missing or unreadable cache: regenerate
        pass
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_train + num_val
    args.train_split = num_train / (num_train + num_val)
    args.seed = seed
    with preserved_host_rng():
        data = make_dataset(args)
    x = torch.as_tensor(data["x"], dtype=torch.float32)
    y = torch.as_tensor(data["y"], dtype=torch.long)
    x_val = torch.as_tensor(data["x_test"], dtype=torch.float32)
    y_val = torch.as_tensor(data["y_test"], dtype=torch.long)
    try:  # best effort: a read-only home only costs the regeneration next time
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(path, [x, y, x_val, y_val], durable=False)
    except OSError:
        pass
    return x, y, x_val, y_val


def mnist1d_datasets(num_train: int = 4000, num_val: int = 1000, seed: int = 42) -> tuple[TensorDataset, TensorDataset]:
    """Generate MNIST-1D train/validation sets (default 4000/1000, the package's own split).

    Raises:
        BatchpilotError: for non-positive sizes.
    """
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 10:
            raise BatchpilotError(f"{name} must be an integer >= 10, got {value!r}")
    x, y, x_val, y_val = _generate(num_train, num_val, seed)
    # The generator makes num_samples // 10 per class: sizes are rounded down to a multiple of 10.
    return TensorDataset(x.clone(), y.clone()), TensorDataset(x_val.clone(), y_val.clone())


class MLP(nn.Module):
    """Three-layer ReLU MLP on the 40-sample signal."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(SEQ_LEN, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Small 1-D CNN (three conv layers, no normalization), after the MNIST-1D paper's baseline."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=1, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=1, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(channels * (SEQ_LEN // 2), NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.unsqueeze(1))
        return self.head(h.flatten(1))


def _adamw(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)


def _sgd(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


MLP_DESC = "MNIST-1D, 3-layer MLP, SGD+momentum; base batch 32, LR 0.05; target val_acc>=0.6"
CNN_DESC = "MNIST-1D, 1-D CNN, AdamW; base batch 32, LR 8e-3 (retuned by the plan's LR check; docs/planning.md); target val_acc>=0.85"


@register("mnist1d-mlp", MLP_DESC)
def mnist1d_mlp(num_train: int = 4000, num_val: int = 1000) -> Workload:
    """MNIST-1D with an MLP trained by SGD with momentum (linear LR scaling applies)."""
    train, val = mnist1d_datasets(num_train, num_val)
    return Workload(
        name="mnist1d-mlp", make_model=MLP, train_data=train, val_data=val,
        loss_sum=cross_entropy_sum, metric_sum=correct_sum, metric_name="val_acc",
        make_optimizer=_sgd, base_batch=32, base_lr=0.05, target=Target("val_acc", ">=", 0.6),
        description=MLP_DESC,
    )


@register("mnist1d-cnn", CNN_DESC)
def mnist1d_cnn(num_train: int = 4000, num_val: int = 1000) -> Workload:
    """MNIST-1D with a small CNN trained by AdamW (square-root LR scaling applies)."""
    train, val = mnist1d_datasets(num_train, num_val)
    return Workload(
        name="mnist1d-cnn", make_model=CNN, train_data=train, val_data=val,
        loss_sum=cross_entropy_sum, metric_sum=correct_sum, metric_name="val_acc",
        make_optimizer=_adamw, base_batch=32, base_lr=8e-3, target=Target("val_acc", ">=", 0.85),
        description=CNN_DESC,
    )

