"""Normalization layers and the batch: detect BatchNorm, convert it, and measure what it costs.

BatchNorm is the one common layer that couples the samples of a batch: it normalises with the
statistics of the batch it sees. So with gradient accumulation it sees micro-batches, and ``k``
micro-batches of ``m`` are *not* one batch of ``k·m`` (seeds/README.md errors 4 and 5: everything
else is exact). :func:`batchpilot.train.bn_bias.measure_bn_accumulation_bias` measures by how much;
the plan and the doctor cite it. The remedies:

* :func:`convert_batchnorm` to ``sync`` (``torch.nn.SyncBatchNorm``: statistics over all DDP ranks),
  ``group`` (GroupNorm, Wu & He 2018: batch-free), or ``ghost``;
* :class:`GhostBatchNorm` (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better"):
  statistics over fixed virtual batches of ``ghost_batch`` samples, so a large batch normalises the
  way the small batch it replaced did.

Conversions return a converted *copy* unless ``inplace=True``; the caller's model is never changed
behind their back.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchpilot.errors import BatchpilotError

SMALL_BN_BATCH = 16
"""BatchNorm statistics over fewer samples than this per device are noisy (Wu & He 2018, fig. 1)."""
TARGETS: tuple[str, ...] = ("sync", "group", "ghost")


def find_batchnorm(model: nn.Module) -> list[str]:
    """Qualified names of the BatchNorm layers (any ``_BatchNorm``: 1d/2d/3d, SyncBatchNorm, lazy)."""
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a batch-coupled normalization layer."""
    return bool(find_batchnorm(model)) or any(isinstance(m, GhostBatchNorm) for m in model.modules())


class GhostBatchNorm(nn.Module):
    """BatchNorm over virtual batches of ``ghost_batch`` samples (Hoffer et al. 2017).

    In training, the input is split along dim 0 into chunks of ``ghost_batch``; each chunk is
    normalised with its own statistics by the wrapped BatchNorm, which also updates its running
    statistics once per chunk. In eval mode it is the wrapped BatchNorm. The parameters and buffers
    are the wrapped layer's (``self.bn``).
    """

    def __init__(self, bn: _BatchNorm, ghost_batch: int) -> None:
        super().__init__()
        if isinstance(ghost_batch, bool) or not isinstance(ghost_batch, int) or ghost_batch < 2:
            raise BatchpilotError(f"ghost batch must be an integer >= 2, got {ghost_batch!r}")
        self.bn, self.ghost_batch = bn, ghost_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] <= self.ghost_batch:
            return self.bn(x)
        return torch.cat([self.bn(chunk) for chunk in torch.split(x, self.ghost_batch)])

    def extra_repr(self) -> str:
        return f"ghost_batch={self.ghost_batch}"


def _group_norm(bn: _BatchNorm, groups: int) -> nn.GroupNorm:
    c = bn.num_features
    g = max(d for d in range(1, min(groups, c) + 1) if c % d == 0)
    gn = nn.GroupNorm(g, c, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    return gn.to(device=bn.weight.device if bn.affine else None)


def _replace(module: nn.Module, make) -> int:
    count = 0
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm):
            setattr(module, name, make(child))
            count += 1
        elif not isinstance(child, GhostBatchNorm):
            count += _replace(child, make)
    return count


def convert_batchnorm(model: nn.Module, to: Literal["sync", "group", "ghost"], *, groups: int = 32,
                      ghost_batch: int = 32, inplace: bool = False) -> nn.Module:
    """Convert every BatchNorm layer of ``model``.

    Args:
        model: the model.
        to: ``sync`` (SyncBatchNorm, for DDP), ``group`` (GroupNorm with the largest divisor of the
            channels <= ``groups``; affine parameters copied) or ``ghost`` (:class:`GhostBatchNorm`).
        groups: GroupNorm's group count (32 in Wu & He 2018).
        ghost_batch: the virtual batch of ``ghost``.
        inplace: change ``model`` itself instead of a copy.

    Raises:
        BatchpilotError: for an unknown target or a model without BatchNorm.
    """
    if to not in TARGETS:
        raise BatchpilotError(f"BatchNorm conversion target must be one of {', '.join(TARGETS)}, got {to!r}")
    if not find_batchnorm(model):
        raise BatchpilotError("the model has no BatchNorm layer to convert")
    out = model if inplace else copy.deepcopy(model)
    if to == "sync":
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(out)
        if inplace and converted is not model:  # a top-level BatchNorm cannot be replaced in place
            raise BatchpilotError("the model is itself a BatchNorm layer: convert a copy (inplace=False)")
        return converted
    make = (lambda bn: _group_norm(bn, groups)) if to == "group" else (lambda bn: GhostBatchNorm(bn, ghost_batch))
    if isinstance(out, _BatchNorm):
        if inplace:
            raise BatchpilotError("the model is itself a BatchNorm layer: convert a copy (inplace=False)")
        return make(out)
    _replace(out, make)
    return out


def batchnorm_caveats(model: nn.Module, micro_batch_per_rank: int, accumulation_steps: int, *,
                      measured_bias: float | None = None, synced_ranks: int = 1) -> list[str]:
    """One-line caveats for a plan or the doctor: BN on a small per-device batch, BN with accumulation.

    Args:
        model: the model.
        micro_batch_per_rank: samples each BatchNorm call sees per device.
        accumulation_steps: micro-batches per optimizer step.
        measured_bias: :func:`~batchpilot.train.bn_bias.measure_bn_accumulation_bias` at this configuration, cited if given.
        synced_ranks: ranks a SyncBatchNorm pools over (1 without it).
    """
    names = find_batchnorm(model)
    if not names:
        return []
    out = []
    seen = micro_batch_per_rank * synced_ranks
    if seen < SMALL_BN_BATCH:
        out.append(f"BatchNorm ({len(names)} layers) normalises over {seen} samples (< {SMALL_BN_BATCH}): noisy statistics; "
                   "use GroupNorm/LayerNorm, SyncBatchNorm, or a larger micro-batch")
    if accumulation_steps > 1:
        bias = f"; measured gradient bias {measured_bias:.1%} of |g|" if measured_bias is not None else ""
        out.append(f"BatchNorm with {accumulation_steps}-step accumulation: statistics come from micro-batches of "
                   f"{micro_batch_per_rank}, not the global batch, so accumulation is not one large batch{bias}")
    return out


def normalization_of(model: nn.Module) -> tuple[str, ...]:
    """Names of the normalization layers in ``model`` (schema names; ``("none",)`` if there are none)."""
    found: list[str] = []
    rms = getattr(nn, "RMSNorm", ())
    for mod in model.modules():
        if isinstance(mod, nn.SyncBatchNorm):
            name = "syncbatchnorm"
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            name = "batchnorm"
        elif isinstance(mod, nn.LayerNorm):
            name = "layernorm"
        elif isinstance(mod, nn.GroupNorm):
            name = "groupnorm"
        elif isinstance(mod, nn.modules.instancenorm._InstanceNorm):
            name = "instancenorm"
        elif rms and isinstance(mod, rms):
            name = "rmsnorm"
        else:
            continue
        if name not in found:
            found.append(name)
    return tuple(found) or ("none",)
