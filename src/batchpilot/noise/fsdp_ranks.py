"""The gradient noise scale from FSDP2 ranks: no extra backward.

Sharded data parallelism (FSDP2, Zhao et al. 2023; ZeRO-3, Rajbhandari et al. 2020) has the same two
batch sizes as DDP (:mod:`batchpilot.noise.ranks`, after McCandlish et al. 2018, Appendix A.1): before
a unit's reduce-scatter its input is this rank's *local* gradient, unsharded (accumulated over the
rank's micro-batches, the non-final ones without gradient sync), and after it each rank holds a shard
of the *global* gradient.

:class:`FsdpRankNoiseScale` installs, on every FSDP unit, a custom reduce-scatter
(``FSDPModule.set_custom_reduce_scatter``) that takes the squared norm of the flat reduce-scatter input
before calling the ordinary ``reduce_scatter_single`` (FSDP's padding is zeros, so it adds nothing), and
an all-reduce hook (``set_all_reduce_hook``) that takes the squared norm of the reduced shard. After
the backward, :meth:`FsdpRankNoiseScale.end_step` sums them over the units and all-reduces one vector of
``2 x world + 1`` numbers (each rank's local norm and unit count, and the shards' norms, whose sum is the
global gradient's): unlike under DDP, where they ride in the last bucket's all-reduce, this is one
small collective of its own per observed step, because a reduce-scatter cannot carry numbers that
every rank needs in full.

Scaling: batchpilot's FSDP trainer (:mod:`batchpilot.train.fsdp`) reduce-scatters *sums*, with each
rank's summed loss divided by the units ``B`` of the global batch; rank r's local gradient is then
``(b_r / B) G_r`` and the reduced one ``G_B``. FSDP's own default (an average over ranks) would divide
the reduced gradient by the world size; the monitor assumes the trainer's scaling.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from batchpilot.errors import BatchpilotError
from batchpilot.noise.microbatch import GradientNoiseScale
from batchpilot.noise.ranks import RankMonitorBase, _sq


def fsdp_rank_inputs(local_sq: Sequence[float], units: Sequence[float]) -> tuple[list[float], list[float], float]:
    """:meth:`GradientNoiseScale.update` arguments from the ranks' local squared norms under sum scaling.

    Args:
        local_sq: ``|g_r|²`` of each rank's local gradient ``g_r = (b_r / B) G_r``.
        units: loss units ``b_r`` of each rank's share; ``B`` is their sum.

    Returns:
        ``(small_sq_norms, small_batches, big_batch)`` for the ranks with at least one unit.
    """
    total = float(sum(units))
    keep = [(s, b) for s, b in zip(local_sq, units) if b > 0]
    return [s * (total / b) ** 2 for s, b in keep], [b for _, b in keep], total


class _NormReduceScatter:
    """FSDP2's default reduce-scatter, with the squared norm of its input recorded first (it duck-types
    FSDP2's private ``ReduceScatter`` interface: ``allocate`` and ``__call__``)."""

    def __init__(self, owner: "FsdpRankNoiseScale") -> None:
        self.owner = owner

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op, async_op: bool = False):
        if self.owner._observing:
            self.owner._local.append(_sq(input_tensor).double())
        return dist.reduce_scatter_single(output_tensor, input_tensor, group=group, op=op, async_op=async_op)


class FsdpRankNoiseScale(RankMonitorBase):
    """B_simple from the ranks of an FSDP2 model (``fully_shard``), fed to a :class:`GradientNoiseScale`.

    On every rank, around each synchronised backward::

        ranks = FsdpRankNoiseScale(model)         # model: fully_shard-ed, summing reduce-scatter
        ranks.begin_step(local_units)             # this rank's units of the global batch
        ... forward/backward (non-final micro-batches with set_requires_gradient_sync(False)) ...
        ranks.end_step()                          # one small all-reduce
        optimizer.step(); optimizer.zero_grad()

    Args:
        model: the root FSDP module (its units are found with ``modules()``).
        monitor: the estimator fed with each step's norms (default: a new :class:`GradientNoiseScale`).
        every: observe one step in ``every``.
        flush_every: queued steps that trigger a :meth:`flush`.
    """

    def __init__(self, model: nn.Module, monitor: GradientNoiseScale | None = None, *, every: int = 1,
                 flush_every: int = 64) -> None:
        from torch.distributed.fsdp import FSDPModule

        for name, value in (("every", every), ("flush_every", flush_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BatchpilotError(f"{name} must be a positive integer, got {value!r}")
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        if not units:
            raise BatchpilotError("FsdpRankNoiseScale needs a model sharded with fully_shard")
        self.monitor = monitor if monitor is not None else GradientNoiseScale()
        self.every, self.flush_every = every, flush_every
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        if self.world < 2:
            raise BatchpilotError("the noise scale from ranks needs at least two ranks")
        self._observing = False
        self._steps = 0
        self._units = 0.0
        self._local: list[torch.Tensor] = []
        self._reduced: list[torch.Tensor] = []
        self._pending: list[torch.Tensor] = []
        comm = _NormReduceScatter(self)
        for unit in units:
            unit.set_custom_reduce_scatter(comm)
            unit.set_all_reduce_hook(self._after_reduce)

    def _after_reduce(self, reduce_output: torch.Tensor) -> None:
        if self._observing:
            self._reduced.append(_sq(reduce_output).double())

    def begin_step(self, local_units: int | float) -> None:
        """Declare this rank's loss units for the coming synchronised backward (call on every rank)."""
        if not local_units >= 0:
            raise BatchpilotError(f"local units must be >= 0, got {local_units!r}")
        self._local, self._reduced = [], []
        self._observing = self._steps % self.every == 0
        self._steps += 1
        self._units = float(local_units)

    def end_step(self) -> None:
        """Gather the step's norms from every rank (one all-reduce of ``2 x world + 1`` numbers) and queue
        them; nothing when the step was not observed. Every rank must call it."""
        if not self._observing:
            return
        self._observing = False
        device = self._local[0].device if self._local else torch.device("cpu")
        stats = torch.zeros(2 * self.world + 1, dtype=torch.float64, device=device)
        if self._local:
            stats[self.rank] = torch.stack(self._local).sum()
        stats[self.world + self.rank] = self._units
        if self._reduced:
            stats[2 * self.world] = torch.stack([r.to(device) for r in self._reduced]).sum()
        self._local, self._reduced = [], []
        dist.all_reduce(stats)
        self._pending.append(stats)
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> list[tuple[float, float]]:
        """Feed the queued steps to the monitor, oldest first; returns their ``(g_sq, trace_sigma)``
        (steps where fewer than two ranks had units are skipped)."""
        pending, self._pending = self._pending, []
        out = []
        for stats in pending:
            values = stats.tolist()
            small, sizes, big = fsdp_rank_inputs(values[: self.world], values[self.world : 2 * self.world])
            big_sq = values[2 * self.world]
            if len(small) >= 2 and big > 0 and big_sq > 0:
                out.append(self.monitor.update(small, big_sq, sizes, big))
        return out
