"""Sharded data parallelism with FSDP2 (``fully_shard``) under ``torchrun``.

Fully sharded data parallelism (Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded
Data Parallel"; the ZeRO-3 partitioning of Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models") keeps 1/world of every parameter, gradient and optimizer state on
each rank: each unit's parameters are all-gathered before its forward (and again before its backward
when resharded after the forward), and its gradients are reduce-scattered after its backward.

batchpilot's trainer uses it exactly like DDP (:mod:`batchpilot.train.distributed`): the same shards
of each global batch, the same unit count all-reduced before any backward. Only the scaling differs:
the reduce-scatter here *sums* (``set_gradient_divide_factor(1)`` with sum-only collectives, which
gloo and NCCL both run; FSDP2's default, an average, runs on gloo too), so each rank scales its summed
loss by ``1 / units`` of the global batch and the reduced gradient is the gradient of the global-batch
mean loss. The reduce-scatter input is then
the rank's own local gradient, unscaled, which is what the noise scale from ranks needs
(:mod:`batchpilot.noise.fsdp_ranks`). Non-final micro-batches run with
``set_requires_gradient_sync(False)``: no communication, gradients accumulate unsharded.

Units (:func:`shard_units`): every module held in an ``nn.ModuleList`` (transformer blocks) and the
children of an ``nn.Sequential`` root, if they own parameters that no other module shares; then the
root, which takes every remaining parameter (embeddings, tied heads, final norms).

Checkpoints (:func:`full_state` / :func:`load_full_state`) gather the full model and optimizer state
(``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True``) onto rank 0's CPU, which
writes them atomically like a DDP checkpoint; every rank loads the file and keeps its shard. That
needs the full state to fit in rank 0's CPU memory (sharded DCP checkpoints are not done).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from batchpilot.errors import BatchpilotError

STRATEGIES = ("ddp", "fsdp")
"""``ddp``: replicated weights, all-reduced gradients; ``fsdp``: FSDP2 ``fully_shard``."""


@dataclass(frozen=True)
class FsdpConfig:
    """How to shard a model.

    Attributes:
        reshard_after_forward: free each unit's gathered parameters after its forward and gather them
            again for the backward (ZeRO-3, less memory) instead of keeping them until the backward
            (ZeRO-2-like, one all-gather fewer per unit). The root keeps its parameters either way.
    """

    reshard_after_forward: bool = True


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules to shard as units of their own, innermost first (the root is not among them).

    A candidate is a child of an ``nn.ModuleList`` (anywhere in the model) or of an ``nn.Sequential``
    root. It becomes a unit when it owns parameters and none of them is also reachable from outside
    it (a tied parameter must live in the unit of the modules sharing it: the root). Modules whose
    parameters are used outside their own ``forward`` are not detected; they are not candidates in
    the usual layouts (a tied LM head reads the embedding in the root's ``forward``).
    """
    owners: dict[int, set[int]] = {}  # parameter id -> ids of the modules holding it directly
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(module))
    candidates = [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]
    if isinstance(model, nn.Sequential):
        candidates += list(model.children())
    units: list[nn.Module] = []
    seen: set[int] = set()
    for module in candidates:
        if id(module) in seen:
            continue
        seen.add(id(module))
        inside = {id(m) for m in module.modules()}
        params = list(module.parameters())
        if params and all(owners[id(p)] <= inside for p in params):
            units.append(module)
    order = {id(m): i for i, m in enumerate(_post_order(model, set()))}  # children before their parent
    return sorted(units, key=lambda m: order[id(m)])  # fully_shard goes bottom-up: nested units first


def _post_order(module: nn.Module, seen: set[int]) -> Iterator[nn.Module]:
    if id(module) in seen:
        return
    seen.add(id(module))
    for child in module.children():
        yield from _post_order(child, seen)
    yield module


def shard_model(model: nn.Module, config: FsdpConfig = FsdpConfig()) -> nn.Module:
    """``fully_shard`` the units of ``model`` and then the root, in place, over the default process group.

    The weights must already be equal on every rank (same seed): each rank keeps its slice of them.
    Gradients are reduce-scattered as sums (see the module docstring). Returns ``model``.

    Raises:
        BatchpilotError: no process group, or parameters on a device other than CPU/CUDA.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise BatchpilotError("--strategy fsdp needs an initialised process group: launch with "
                              "`torchrun --nproc-per-node N -m batchpilot train ...` or `batchpilot train --nproc N`")
    device = next(model.parameters()).device
    if device.type not in ("cpu", "cuda"):
        raise BatchpilotError(f"--strategy fsdp runs on CPU (gloo) or CUDA (NCCL) parameters, not {device.type}")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=config.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=config.reshard_after_forward)
    for module in fsdp_modules(model):
        module.set_gradient_divide_factor(1.0)  # sum: the loop divides by the global unit count itself
        # a divide factor alone makes FSDP use ReduceOp.PREMUL_SUM(1/factor): "Cannot use ReduceOp.PREMUL_SUM
        # with Gloo"; forcing sum-only collectives gives a plain SUM (and a division by 1, skipped)
        module.set_force_sum_reduction_for_comms(True)
    return model


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """Every FSDP unit of ``model``, the root included (in ``modules()`` order: root first)."""
    return [m for m in model.modules() if _is_fsdp(m)]


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Backward passes inside accumulate unsharded gradients locally, without any reduce-scatter
    (FSDP2's counterpart of DDP's ``no_sync``)."""
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the sharded gradients to a global norm of ``max_norm``; returns the norm before clipping.

    ``clip_grad_norm_`` on DTensor gradients reduces the shards' norms over the mesh (a small
    all-reduce), so every rank clips by the same factor: the norm of the full gradient.
    """
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    full = getattr(total, "full_tensor", None)
    return float(full() if full is not None else total)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full (unsharded) model and optimizer state dicts on rank 0's CPU, keyed by parameter name.

    A collective: every rank must call it. The other ranks get empty dicts.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                    optim_state: dict[str, Any] | None) -> None:
    """Load full state dicts (as :func:`full_state` wrote them, present on every rank) into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True)
    if optim_state is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, model_state, options=options)
        return
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)


def check_fsdp_options(*, world_size: int, ema: bool, sync_batchnorm: bool) -> None:
    """Refuse what FSDP does not run here, in one line each.

    Raises:
        BatchpilotError: one process (nothing to shard over), an EMA of the weights, or SyncBatchNorm.
    """
    if world_size < 2:
        raise BatchpilotError("--strategy fsdp shards over ranks: launch with `torchrun --nproc-per-node N -m batchpilot "
                              "train --strategy fsdp ...` or `batchpilot train --nproc N --strategy fsdp` (N >= 2); "
                              "one process trains without it")
    if ema:
        raise BatchpilotError("--ema is not supported with --strategy fsdp (the averaged copy would be a second, "
                              "unsharded model); use --strategy ddp")
    if sync_batchnorm:
        raise BatchpilotError("--sync-bn is not supported with --strategy fsdp; use --strategy ddp")
