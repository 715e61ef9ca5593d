"""How far gradient accumulation moves the gradient of a model with BatchNorm (seeds/README.md errors 4, 5).

Without a batch-coupled layer, ``k`` micro-batches of ``m`` are exactly one batch of ``k·m``; with
BatchNorm they are not, and :func:`measure_bn_accumulation_bias` says by how much.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from batchpilot.errors import BatchpilotError
from batchpilot.train.accumulation import accumulate_gradients
from batchpilot.workloads.data import fetch, split_micro


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
                      for p in model.parameters()])


@torch.no_grad()
def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def measure_bn_accumulation_bias(workload, global_batch: int, micro_batch: int, *, batches: int = 4,
                                 seed: int = 0, dtype: torch.dtype = torch.float64) -> float:
    """Relative gradient error of accumulation under BatchNorm: ``||g_acc − g_full|| / ||g_full||``.

    ``g_full`` is the gradient of one batch of ``global_batch`` samples, ``g_acc`` the exact
    accumulation of the same samples in micro-batches of ``micro_batch`` (loss normalised by the
    global count, as in the trainer). Both are taken at the workload's freshly initialised model
    (seeded by ``seed``) in training mode, in float64 so rounding is negligible: without a
    batch-coupled layer the result is ~1e-15; with BatchNorm it is the bias accumulation adds. The
    mean over ``batches`` random batches is returned. The caller's RNG is untouched.

    Raises:
        BatchpilotError: for sizes that do not fit the training set or do not divide.
    """
    n = workload.num_train
    if not 1 <= micro_batch <= global_batch <= n:
        raise BatchpilotError(f"need 1 <= micro batch ({micro_batch}) <= global batch ({global_batch}) <= {n}")
    rels = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = workload.make_model().to(dtype).train()
        start = _snapshot(model)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(batches):
            idx = torch.randperm(n, generator=gen)[:global_batch]
            grads = []
            for size in (global_batch, micro_batch):
                model.load_state_dict(start)  # BN running statistics back to where they were
                model.zero_grad(set_to_none=True)
                micro = []
                for part in split_micro(idx, size):
                    x, y = fetch(workload.train_data, part)
                    micro.append((x.to(dtype) if x.is_floating_point() else x, y))
                accumulate_gradients(model, micro, workload.loss_sum, workload.count_units)
                grads.append(_flat_grad(model))
            full, acc = grads
            rels.append(float(torch.linalg.vector_norm(acc - full) / torch.linalg.vector_norm(full)))
    return math.fsum(rels) / len(rels)
