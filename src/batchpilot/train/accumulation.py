"""Exact gradient accumulation: k micro-batches give the update of one batch of k*m.

Each micro-batch's *summed* loss is divided by the number of units (samples, or
tokens) in the whole global batch, counted before any backward pass. The
accumulated gradient is then exactly the gradient of the global-batch mean loss,
ragged last batches and variable token counts included (up to float rounding).
Parameters do not change during accumulation, so nothing is "stale" (seeds/README.md,
error 4). Batch-coupled layers (BatchNorm) are the exception: they see micro-batch
statistics.

Under DDP, the non-final micro-batches run inside ``model.no_sync()`` (under FSDP2, with gradient sync off).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence

import torch
from torch import nn

MicroBatch = tuple[torch.Tensor, torch.Tensor]
AfterMicro = Callable[[int, int], None]
"""``after_micro(index, units)``: called after each micro-batch's backward (for example by a noise monitor)."""


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Sequence[MicroBatch],
    loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    count_units: Callable[[torch.Tensor], int],
    *,
    total_units: int | None = None,
    loss_scale: float = 1.0,
    after_micro: AfterMicro | None = None,
    no_sync: Callable[[], ContextManager[None]] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    scaler: object | None = None,
) -> float:
    """Run forward and backward over ``micro_batches``, adding into ``p.grad``.

    Args:
        model: the module (a DDP wrapper gets ``no_sync`` on all but the last micro-batch).
        micro_batches: ``(inputs, targets)`` pairs that make up one global batch on this rank.
        loss_sum: loss summed over a batch's units.
        count_units: units in a target batch.
        total_units: units in the global batch; defaults to the sum over ``micro_batches``
            (a DDP caller passes the all-reduced count).
        loss_scale: multiplies every micro loss (a DDP caller passes the world size, since
            DDP averages gradients over ranks).
        after_micro: optional hook after each backward.
        no_sync: a context without gradient synchronisation for the non-final micro-batches
            (default: the model's ``no_sync``, as DDP has; an FSDP2 caller passes
            :func:`batchpilot.train.fsdp.no_gradient_sync`).
        autocast: a factory of the autocast region the forward and the loss run in (mixed precision,
            :mod:`batchpilot.throughput.amp`); the backward runs outside it, as PyTorch's AMP recipe does.
        scaler: a ``torch.amp.GradScaler`` (fp16): each backward runs on the scaled loss; the caller
            unscales before clipping and steps through the scaler.

    Returns:
        The global-batch mean loss as a float (this rank's share when ``total_units`` spans ranks).
    """
    if not micro_batches:
        raise ValueError("accumulate_gradients needs at least one micro-batch")
    units = [count_units(y) for _, y in micro_batches]
    total = total_units if total_units is not None else sum(units)
    if total <= 0:
        raise ValueError(f"the global batch has {total} loss units; nothing to train on")
    no_sync = no_sync if no_sync is not None else getattr(model, "no_sync", None)
    loss_total = 0.0
    last = len(micro_batches) - 1
    for i, (x, y) in enumerate(micro_batches):
        ctx = no_sync() if (no_sync is not None and i < last) else contextlib.nullcontext()
        with ctx:
            with autocast() if autocast is not None else contextlib.nullcontext():
                loss = loss_sum(model(x), y) * (loss_scale / total)
            (scaler.scale(loss) if scaler is not None else loss).backward()  # type: ignore[attr-defined]
        loss_total += float(loss.detach()) / loss_scale
        if after_micro is not None:
            after_micro(i, units[i])
    return loss_total
