"""Evaluation of a model on a split, and the metrics a run reports (what a target may name)."""

from __future__ import annotations

import torch
from torch import nn

from batchpilot.errors import BatchpilotError
from batchpilot.workloads import Target, Workload
from batchpilot.workloads.data import fetch

EVAL_BATCH = 1024


def _to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


@torch.no_grad()
def evaluate(model: nn.Module, workload: Workload, dtype: torch.dtype = torch.float32, *, split: str = "val") -> dict[str, float]:
    """Mean loss and metric of ``model`` on a split, in eval mode; the training mode is restored after."""
    data = workload.val_data if split == "val" else workload.train_data
    was_training = model.training
    model.eval()
    loss_sum = metric_sum = 0.0
    units = 0
    n = len(data)  # type: ignore[arg-type]
    for start in range(0, n, EVAL_BATCH):
        x, y = fetch(data, torch.arange(start, min(n, start + EVAL_BATCH)))
        out = model(_to_dtype(x, dtype))
        loss_sum += float(workload.loss_sum(out, y))
        if workload.metric_sum is not None:
            metric_sum += float(workload.metric_sum(out, y))
        units += workload.count_units(y)
    model.train(was_training)
    loss = loss_sum / units
    metric = metric_sum / units if workload.metric_sum is not None else loss
    return {f"{split}_loss": loss, f"{split}_metric": metric}


def reported_metrics(workload: Workload) -> tuple[str, ...]:
    """The metrics a target can name: those in every evaluation record of ``workload``."""
    return tuple(dict.fromkeys((workload.metric_name, "val_loss", "loss")))


def check_target_metric(target: Target | None, workload: Workload) -> None:
    """Refuse a target on a metric the workload never reports (it could never be reached)."""
    if target is None:
        return
    known = reported_metrics(workload)
    if target.metric not in known:
        raise BatchpilotError(f"target {str(target)!r} names metric {target.metric!r}, which workload "
                              f"{workload.name!r} does not report; expected one of: {', '.join(known)}")
