"""The gradient noise scale from DDP ranks, for free: no extra backward, no extra collective.

McCandlish et al. (2018, "An Empirical Model of Large-Batch Training", Appendix A.1) estimate
B_simple = tr(Σ)/|G|² from gradient norms at two batch sizes, and point out that data parallelism
hands them over: each rank's *local* gradient, before the all-reduce, is a small-batch gradient
(``b_r`` = the rank's units, B/world), and the averaged gradient after it is the big-batch one
(``B``). Under gradient accumulation the local gradient is the one accumulated over the rank's
micro-batches (the non-final ones run in ``no_sync``), so the two sizes stay B/world and B.

:class:`RankNoiseScale` registers a DDP communication hook that wraps ``allreduce_hook``: for each
gradient bucket it takes the squared norm of the local gradient before the all-reduce and of the
averaged one after it. The ranks' local norms and unit counts ride along in the last bucket's
all-reduce (``2 x world`` extra numbers; no collective of their own). After the backward,
:meth:`RankNoiseScale.end_step` queues one step's norms for
:meth:`batchpilot.noise.microbatch.GradientNoiseScale.update`, which keeps the estimator, the separate EMAs
of numerator and denominator and the bootstrap spread.

Scaling. batchpilot's trainer multiplies each rank's *summed* loss by ``world / B`` (``B`` = units in
the global batch), so rank r's gradient is ``world (b_r / B) G_r`` and the average is exactly
``G_B``; ``normalization="global"`` undoes the factor. A plain DDP loop averages each rank's loss over
its own units (``normalization="mean"``): the local gradient is ``G_r`` and the average, a mean of
means, has the variance of a batch of ``world² / Σ 1/b_r`` units (B when the shards are equal).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from batchpilot.errors import BatchpilotError
from batchpilot.noise.microbatch import GradientNoiseScale, NoiseEstimate

NORMALIZATIONS = ("global", "mean")
_FUSED_DTYPES = (torch.float32, torch.float64)


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Squared norm as a 0-d float tensor (no host sync); half precision accumulates in float32."""
    if t.dtype in _FUSED_DTYPES:
        return torch.dot(t, t)
    return torch.linalg.vector_norm(t, dtype=torch.float32).square()


def rank_estimates_inputs(local_sq: Sequence[float], units: Sequence[float], normalization: str = "global"
                          ) -> tuple[list[float], list[float], float]:
    """Turn the ranks' raw local squared norms into :meth:`GradientNoiseScale.update` arguments.

    Args:
        local_sq: ``|g_r|²`` of each rank's local (pre-all-reduce) gradient, as the loop scaled it.
        units: loss units of each rank's share of the global batch.
        normalization: how the loop scaled each rank's loss (see the module docstring).

    Returns:
        ``(small_sq_norms, small_batches, big_batch)`` for the ranks with at least one unit.
    """
    if normalization not in NORMALIZATIONS:
        raise BatchpilotError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    world = len(units)
    total = float(sum(units))
    keep = [(s, b) for s, b in zip(local_sq, units) if b > 0]
    if normalization == "global":
        small = [s * (total / (world * b)) ** 2 for s, b in keep]
        big = total
    else:
        small = [s for s, _ in keep]
        big = world**2 / sum(1.0 / b for b in units) if all(b > 0 for b in units) else 0.0
    return small, [b for _, b in keep], big


class RankMonitorBase:
    """What the rank estimators share: a :class:`GradientNoiseScale` ``monitor`` fed by their ``flush()``."""

    monitor: GradientNoiseScale

    def flush(self) -> list[tuple[float, float]]:  # pragma: no cover - each estimator defines it
        raise NotImplementedError

    def estimate(self, recent: int | None = None) -> NoiseEstimate:
        """The monitor's smoothed B_simple with its spread (see :meth:`GradientNoiseScale.estimate`;
        ``recent``: over the last that many observed steps only)."""
        self.flush()
        return self.monitor.estimate(recent)

    @property
    def history(self) -> list[tuple[float, float]]:
        """Per-step ``(g_sq, trace_sigma)`` estimates."""
        self.flush()
        return self.monitor.history


class RankNoiseScale(RankMonitorBase):
    """B_simple from the ranks of a DDP model (McCandlish et al. 2018, Appendix A.1).

    In a loop of your own, on every rank::

        ddp = DistributedDataParallel(model)
        ranks = RankNoiseScale(ddp)                 # registers the communication hook
        for batch in loader:                        # this rank's share of the global batch
            ranks.begin_step(local_units=len(batch))
            ... forward/backward (non-final micro-batches inside ddp.no_sync()) ...
            ranks.end_step()
            optimizer.step(); optimizer.zero_grad()
        print(ranks.estimate().b_simple)            # in units (samples or tokens)

    The step path does no host synchronisation: :meth:`end_step` queues the step's norms (as
    tensors) and they reach the monitor in batches (:meth:`flush`, called by :meth:`estimate` and
    :attr:`history`, and every ``flush_every`` steps).

    Args:
        ddp_model: a ``DistributedDataParallel`` module without a communication hook yet.
        monitor: the estimator fed with each step's norms (default: a new :class:`GradientNoiseScale`).
        normalization: ``global`` (each rank's summed loss x world / global units, as batchpilot's
            trainer) or ``mean`` (each rank averages its own loss, as a plain DDP loop).
        every: observe one step in ``every``; the other steps run the plain ``allreduce_hook``.
        flush_every: queued steps that trigger a :meth:`flush`.
    """

    def __init__(self, ddp_model: nn.Module, monitor: GradientNoiseScale | None = None, *,
                 normalization: str = "global", every: int = 1, flush_every: int = 64) -> None:
        if normalization not in NORMALIZATIONS:
            raise BatchpilotError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
        for name, value in (("every", every), ("flush_every", flush_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BatchpilotError(f"{name} must be a positive integer, got {value!r}")
        if not hasattr(ddp_model, "register_comm_hook"):
            raise BatchpilotError("RankNoiseScale needs a DistributedDataParallel model")
        self.monitor = monitor if monitor is not None else GradientNoiseScale()
        self.normalization, self.every, self.flush_every = normalization, every, flush_every
        self.group = getattr(ddp_model, "process_group", None) or dist.group.WORLD
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if self.world < 2:
            raise BatchpilotError("the noise scale from ranks needs at least two ranks")
        self._steps = 0
        self._units: float | None = None
        self._ext: torch.Tensor | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._local: list[torch.Tensor] = []
        self._reduced: list[torch.Tensor] = []
        self._stats: torch.Tensor | None = None
        ddp_model.register_comm_hook(state=self.group, hook=self._hook)

    # -- the step ---------------------------------------------------------------------------
    def begin_step(self, local_units: int | float) -> None:
        """Declare this rank's loss units for the coming synchronised backward (call on every rank)."""
        if not local_units >= 0:
            raise BatchpilotError(f"local units must be >= 0, got {local_units!r}")
        self._local, self._reduced, self._stats = [], [], None
        self._steps += 1
        self._units = float(local_units) if (self._steps - 1) % self.every == 0 else None

    def end_step(self) -> None:
        """Queue the finished step's norms for the monitor (nothing when the step was not observed:
        ``every``, no :meth:`begin_step`, or no synchronised backward)."""
        stats, reduced = self._stats, self._reduced
        self._units, self._stats, self._reduced, self._local = None, None, [], []
        if stats is None or not reduced:
            return
        big_sq = reduced[0] if len(reduced) == 1 else torch.stack([r.double() for r in reduced]).sum()
        self._pending.append((stats, big_sq))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> list[tuple[float, float]]:
        """Feed the queued steps to the monitor, oldest first; returns their ``(g_sq, trace_sigma)``
        (steps where fewer than two ranks had units are skipped)."""
        pending, self._pending = self._pending, []
        out = []
        for stats, big_sq in pending:
            values = stats.tolist()
            small, sizes, big = rank_estimates_inputs(values[: self.world], values[self.world :], self.normalization)
            if len(small) >= 2 and big > 0:
                out.append(self.monitor.update(small, float(big_sq), sizes, big))
        return out

    # -- the communication hook -------------------------------------------------------------
    def _hook(self, group, bucket):  # no annotations: DDP checks them against the real classes, and ours are strings
        if self._units is None:
            return self._plain(group, bucket.buffer())
        buf = bucket.buffer()
        local = _sq(buf)
        if not bucket.is_last():
            self._local.append(local)
            return self._plain(group, buf).then(self._after)
        if self._local:
            local = torch.stack([x.to(local.dtype) for x in self._local] + [local]).sum()
        if buf.dtype not in _FUSED_DTYPES:  # half precision: the numbers need float32, so a collective of their own
            stats = torch.zeros(2 * self.world, dtype=torch.float32, device=buf.device)
            stats[self.rank] = local
            stats[self.world + self.rank] = self._units
            dist.all_reduce(stats, group=group)
            self._stats = stats
            return self._plain(group, buf).then(self._after)
        n = buf.numel()
        ext = self._ext
        if ext is None or ext.numel() != n + 2 * self.world or ext.dtype != buf.dtype or ext.device != buf.device:
            ext = self._ext = torch.empty(n + 2 * self.world, dtype=buf.dtype, device=buf.device)
            self._ext_grad, self._ext_tail = ext[:n], ext[n:]
        torch.div(buf, self.world, out=self._ext_grad)
        tail = self._ext_tail
        tail.zero_()
        tail[self.rank] = local
        tail[self.world + self.rank] = self._units
        return group.allreduce([ext]).get_future().then(self._after_last)

    @staticmethod
    def _plain(group, buf: torch.Tensor) -> torch.futures.Future:
        """``allreduce_hook`` on the process group directly (without ``dist.all_reduce``'s Python wrapper)."""
        buf.div_(group.size())
        return group.allreduce([buf]).get_future().then(_first)

    def _after_last(self, fut: torch.futures.Future) -> torch.Tensor:
        self._stats = self._ext_tail.clone()  # the buffer is reused next step
        grad = self._ext_grad
        self._reduced.append(_sq(grad))
        return grad

    def _after(self, fut: torch.futures.Future) -> torch.Tensor:
        out = fut.value()
        self._reduced.append(_sq(out))
        return out


def _first(fut: torch.futures.Future) -> torch.Tensor:
    return fut.value()[0]
