"""Large-batch optimizers (one algorithm per file, in the style of timm's ``optim/``) and the
``--optimizer`` choice of ``batchpilot train``.

* :class:`LARS` (You et al. 2017) and :class:`LAMB` (You et al. 2019): layer-wise trust ratios.
  Neither writes to ``p.grad``.
* :func:`with_optimizer`: a copy of a workload that trains with another optimizer. A workload's
  ``base_lr`` was tuned for *its* optimizer; for a different one, the starting LR below is an
  untuned starting point (to be confirmed with a sweep), not a tuned value.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch
from torch import nn

from batchpilot.errors import BatchpilotError
from batchpilot.optim.lamb import LAMB
from batchpilot.optim.lars import LARS, exclude_bias_and_norm
from batchpilot.workloads import Workload

OPTIMIZERS: tuple[str, ...] = ("default", "sgd", "adamw", "lars", "lamb")


def _split_1d(params: Iterable, weight_decay: float, **plain_opts) -> list[dict]:
    params = [p for p in params if getattr(p, "requires_grad", True)]
    matrices = [p for p in params if p.ndim > 1]
    vectors = [p for p in params if p.ndim <= 1]
    groups = [{"params": matrices, "weight_decay": weight_decay}] if matrices else []
    if vectors:
        groups.append({"params": vectors, "weight_decay": 0.0, **plain_opts})
    return groups


def make_sgd(params: Iterable, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 and weight decay 5e-4."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def make_adamw(params: Iterable, lr: float) -> torch.optim.Optimizer:
    """AdamW with weight decay 1e-4."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)


def make_lars(params: Iterable, lr: float) -> torch.optim.Optimizer:
    """LARS (momentum 0.9, weight decay 5e-4, trust coefficient 0.001); biases and other 1-D
    tensors get neither weight decay nor the trust ratio (see :func:`exclude_bias_and_norm`)."""
    return LARS(_split_1d(params, 5e-4, adapt=False), lr=lr, momentum=0.9, trust_coefficient=0.001)


def make_lamb(params: Iterable, lr: float) -> torch.optim.Optimizer:
    """LAMB (betas 0.9/0.999, eps 1e-6, weight decay 0.01 on matrices, none on 1-D tensors)."""
    return LAMB(_split_1d(params, 0.01), lr=lr, eps=1e-6)


# name -> (factory, starting LR at the workload's base batch when the workload uses another optimizer)
FACTORIES: dict[str, tuple[Callable[[Iterable, float], torch.optim.Optimizer], float]] = {
    "sgd": (make_sgd, 0.05),
    "adamw": (make_adamw, 1e-3),
    "lars": (make_lars, 2.0),
    "lamb": (make_lamb, 5e-3),
}


def with_optimizer(workload: Workload, name: str) -> Workload:
    """``workload`` trained with optimizer ``name`` (``default`` returns it unchanged).

    If the workload already uses that optimizer class, it is returned unchanged (its own
    hyperparameters and tuned ``base_lr`` are kept). Otherwise ``make_optimizer`` is replaced and
    ``base_lr`` becomes the optimizer's untuned starting point in :data:`FACTORIES`.

    Raises:
        BatchpilotError: for an unknown name.
    """
    if name not in OPTIMIZERS:
        raise BatchpilotError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name == "default" or workload.optimizer_family() == name:
        return workload
    factory, start_lr = FACTORIES[name]
    return dataclasses.replace(workload, make_optimizer=factory, base_lr=start_lr)


__all__ = ["FACTORIES", "LAMB", "LARS", "OPTIMIZERS", "exclude_bias_and_norm", "make_lamb", "make_lars",
           "with_optimizer"]
