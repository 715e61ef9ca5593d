"""How a model is sharded for data parallelism: the options, the FSDP units, and a fake process group.

Two strategies, after the ZeRO stages (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models") as PyTorch's FSDP implements them (Zhao et al. 2023, "PyTorch
FSDP: Experiences on Scaling Fully Sharded Data Parallel"):

* ``ddp``: every rank holds the whole model, its gradients and optimizer state (ZeRO stage 0).
* ``fsdp``: FSDP2's ``fully_shard``. Parameters, gradients and optimizer state are split in ``1/N``
  pieces over the ``N`` ranks; each *unit*'s parameters are all-gathered just before its forward (and
  again before its backward when they were freed after the forward, ``reshard_after_forward=True``:
  ZeRO-3; ``False`` keeps them to the end of the backward: ZeRO-2-like), and its gradients are
  reduce-scattered after its backward.

The units are the ones torchtitan uses for transformers: every entry of every ``nn.ModuleList``
(the blocks), then the root, which takes the parameters left over (embeddings, final norm, head).
A model without a ``ModuleList`` is one unit, the root. :func:`fsdp_units` names them.

Tracing needs a process group of ``N`` ranks in one process: :func:`fake_process_group` opens
PyTorch's ``fake`` backend (``torch.testing._internal.distributed.fake_pg``), whose collectives do
nothing; under fake tensors nothing is allocated either, so any ``N`` traces on one CPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from torch import nn

from batchpilot.errors import BatchpilotError

STRATEGIES = ("ddp", "fsdp")
MAX_WORLD_SIZE = 1 << 16


@dataclass(frozen=True)
class ShardingConfig:
    """How the data-parallel ranks hold the model.

    Attributes:
        strategy: ``"ddp"`` (replicated) or ``"fsdp"`` (FSDP2 ``fully_shard``).
        world_size: data-parallel ranks the states are sharded over.
        reshard_after_forward: FSDP frees each unit's gathered parameters after its forward and
            all-gathers them again in the backward (ZeRO-3); ``False`` keeps them (ZeRO-2-like).
        cpu_offload: FSDP keeps the sharded parameters, gradients and optimizer state in host memory
            (``CPUOffloadPolicy``); the device holds what is in flight, activations and temporaries.
    """

    strategy: str = "ddp"
    world_size: int = 1
    reshard_after_forward: bool = True
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise BatchpilotError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise BatchpilotError(f"world size must be a positive integer, got {self.world_size!r}")
        if self.world_size > MAX_WORLD_SIZE:
            raise BatchpilotError(f"world size {self.world_size} is beyond {MAX_WORLD_SIZE}")
        if self.strategy == "ddp" and self.cpu_offload:
            raise BatchpilotError("--cpu-offload applies to --strategy fsdp only: DDP keeps every state on the device")
        if self.strategy == "ddp" and not self.reshard_after_forward:
            raise BatchpilotError("--no-reshard-after-forward applies to --strategy fsdp only")

    @property
    def sharded(self) -> bool:
        """Whether the states are sharded (FSDP)."""
        return self.strategy == "fsdp"

    def describe(self) -> str:
        """One line, e.g. ``fsdp over 8 ranks, resharded after forward (ZeRO-3)``."""
        if not self.sharded:
            return f"ddp over {self.world_size} rank{'s' if self.world_size > 1 else ''} (replicated states)"
        how = "resharded after forward (ZeRO-3)" if self.reshard_after_forward else "kept after forward (ZeRO-2-like)"
        extra = ", states offloaded to CPU" if self.cpu_offload else ""
        single = "; one rank: nothing is sharded, FSDP only adds its gather buffers" if self.world_size == 1 else ""
        return f"fsdp over {self.world_size} rank{'s' if self.world_size > 1 else ''}, {how}{extra}{single}"

    def to_dict(self) -> dict[str, object]:
        """Plain data."""
        return {"strategy": self.strategy, "world_size": self.world_size,
                "reshard_after_forward": self.reshard_after_forward, "cpu_offload": self.cpu_offload}


def fsdp_units(model: nn.Module) -> list[str]:
    """Qualified names of the modules that become FSDP units, innermost first; ``""`` is the root.

    Every entry of every ``nn.ModuleList`` that holds parameters (transformer blocks), then the root.
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            names += [f"{name}.{i}" if name else str(i) for i, child in enumerate(module)
                      if any(True for _ in child.parameters())]
    return names + [""]


def apply_fully_shard(model: nn.Module, config: ShardingConfig, mesh: Any, *, mp_dtype: object = None) -> list[str]:
    """``fully_shard`` every unit of :func:`fsdp_units` over ``mesh`` (1-D, ``config.world_size``); return the units.

    ``mp_dtype`` (a torch dtype) sets ``MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=float32)``:
    fp32 master weights, low-precision compute and all-gathers, fp32 gradient reduction (torchtitan's default).
    """
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype is not None \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=False) if config.cpu_offload else OffloadPolicy()
    units = fsdp_units(model)
    modules = dict(model.named_modules())
    for name in units:
        fully_shard(modules[name], mesh=mesh, reshard_after_forward=config.reshard_after_forward if name else False,
                    mp_policy=mp, offload_policy=offload)
    return units


def fsdp_tracing_available() -> bool:
    """Whether this torch has what the FSDP trace uses: ``fully_shard``, ``FSDPMemTracker`` and the fake backend."""
    try:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return False
    needed = ("get_tracker_snapshot", "reset_mod_stats", "track_inputs", "_update_peak_stats")
    return all(hasattr(FSDPMemTracker, name) for name in needed)


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[Any]:
    """A default process group of ``world_size`` ranks (this process is rank 0) whose collectives do nothing;
    yields its 1-D CPU device mesh (made here: a mesh cannot be built under fake tensors).

    Raises:
        BatchpilotError: a process group is already initialized here (a real run: trace before it starts).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise BatchpilotError("cannot trace FSDP memory inside an initialized process group (under torchrun); "
                              "run batchpilot memory --strategy fsdp as a single process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()
