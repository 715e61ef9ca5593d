"""SyncBatchNorm on request, on GPUs (``torch.nn.SyncBatchNorm``) and on CPU ranks (gloo).

Under DDP each rank's BatchNorm normalises with its own samples' statistics; SyncBatchNorm pools them
over the ranks, so a BN model at world size W normalises like one process at the same batch
(seed 000: contrastive learning and small per-device batches need it). ``torch.nn.SyncBatchNorm``
runs only on accelerators, and DDP refuses it on CPU modules, so CPU ranks get
:class:`CpuSyncBatchNorm`: the same statistics from two autograd-aware all-reduces
(``torch.distributed.nn.functional.all_reduce``: the backward all-reduces the gradients of the
statistics, as torch's kernel does). The batch mean and the biased variance normalise; the running
variance gets the unbiased one over all ranks' samples, as in BatchNorm (Ioffe & Szegedy 2015).
Under accumulation the statistics pool ``micro-batch x world`` samples, not the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchpilot.errors import BatchpilotError


class CpuSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are all-reduced over a process group (any device, any backend).

    Outside training, or without a process group of more than one rank, it is plain BatchNorm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not self.training or group is None or dist.get_world_size(group) == 1:
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        local = torch.cat([input.sum(dims), input.new_full((1,), input.numel() // max(1, channels))])
        total = all_reduce(local, group=group)
        count = total[-1]
        mean = total[:-1] / count
        centered = input - mean.view(shape)
        var = all_reduce(centered.square().sum(dims), group=group) / count
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = float(count)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (n / max(n - 1, 1.0)), alpha=factor)
        return out


def _to_cpu_sync(module: nn.Module, process_group) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, (CpuSyncBatchNorm, nn.SyncBatchNorm)):
        ref = next(iter(module.parameters()), None)
        new = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group,
                               device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new
    for name, child in module.named_children():
        module.add_module(name, _to_cpu_sync(child, process_group))
    return module


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Convert ``model``'s BatchNorm layers in place for DDP: torch's SyncBatchNorm on accelerators
    (through :func:`batchpilot.norm.convert_batchnorm`), :class:`CpuSyncBatchNorm` on CPU.

    Raises:
        BatchpilotError: the model has no BatchNorm, or is itself a BatchNorm layer.
    """
    from batchpilot.norm import convert_batchnorm, find_batchnorm

    if not find_batchnorm(model):
        raise BatchpilotError("SyncBatchNorm asked for, but the model has no BatchNorm layer")
    if isinstance(model, _BatchNorm):
        raise BatchpilotError("the model is itself a BatchNorm layer: wrap it in a module first")
    ref = next(iter(model.parameters()), None)
    if ref is not None and ref.device.type != "cpu":
        return convert_batchnorm(model, "sync", inplace=True)
    return _to_cpu_sync(model, process_group)
