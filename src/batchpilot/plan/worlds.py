"""Plans across world sizes: the all-reduce term of the step time, and one global batch at every size.

Data parallelism over W ranks adds one gradient all-reduce per optimizer step (accumulation does
not add more: the non-final micro-batches run in ``no_sync``). A ring all-reduce sends
``2(W-1)/W`` of the gradient bytes over each rank's link in ``2(W-1)`` steps (Patarasuk & Yuan 2009,
"Bandwidth optimal all-reduce algorithms"; NCCL reports the same "bus bandwidth")::

    allreduce_s(W) = 2(W-1)/W · gradient_bytes / bus_bandwidth + 2(W-1) · latency

The bandwidth is given (``--allreduce-gbps``) or measured here between two gloo processes. The model
adds the all-reduce to the step without overlap; DDP overlaps the early buckets' all-reduce with the
rest of the backward, so the predicted step time is an upper bound.

The global batch is what the LR, the warmup and the noise scale belong to; when the world size
changes it stays the same and the accumulation absorbs the change (``B = micro x accumulation x W``).
:func:`elastic_splits` lists, for a planned global batch, the split at each world size.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from batchpilot.errors import BatchpilotError

RECOMMEND_MARGIN = 0.05
"""The recommended world size is the smallest whose goodput is within this fraction of the best."""
MAX_LISTED_WORLD = 1024


@dataclass(frozen=True)
class CommModel:
    """All-reduce time of one step's gradient.

    Attributes:
        gradient_bytes: bytes all-reduced per optimizer step (trainable parameters x element size).
        bus_gbps: bus bandwidth in GB/s (1e9 bytes/s), in the ring all-reduce convention.
        latency_s: per-hop latency.
        source: where the bandwidth comes from (measured, or given).
    """

    gradient_bytes: int
    bus_gbps: float
    latency_s: float
    source: str

    def __post_init__(self) -> None:
        if not (self.bus_gbps > 0 and math.isfinite(self.bus_gbps)):
            raise BatchpilotError(f"all-reduce bandwidth must be a positive number of GB/s, got {self.bus_gbps!r}")
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise BatchpilotError(f"all-reduce latency must be >= 0 seconds, got {self.latency_s!r}")
        if self.gradient_bytes < 0:
            raise BatchpilotError(f"gradient bytes must be >= 0, got {self.gradient_bytes!r}")

    def allreduce_s(self, world_size: int) -> float:
        """Seconds per optimizer step for the gradient all-reduce at ``world_size`` (0 on one rank)."""
        if world_size <= 1:
            return 0.0
        hops = 2 * (world_size - 1)
        return hops / world_size * self.gradient_bytes / (self.bus_gbps * 1e9) + hops * self.latency_s

    def to_dict(self) -> dict:
        """Plain data."""
        return asdict(self)


@dataclass(frozen=True)
class StepTimeWithComm:
    """A step-time model (``step_s(micro, accumulation)``) plus a fixed all-reduce per step."""

    base: object
    comm_s: float

    def step_s(self, micro_batch: int, accumulation_steps: int = 1) -> float:
        return self.base.step_s(micro_batch, accumulation_steps) + self.comm_s  # type: ignore[attr-defined]


def gradient_bytes(workload) -> int:
    """Bytes of one gradient: the trainable parameters of a fresh model (built under a forked RNG)."""
    with torch.random.fork_rng(devices=[]):
        model = workload.make_model()
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


MAX_WORLD_SIZE = 1_000_000
"""The largest world size accepted (beyond any cluster; a typo such as an extra zero digit row fails early)."""


def parse_world_sizes(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> ``(1, 2, 4, 8)`` (sorted, unique, each >= 1)."""
    try:
        sizes = sorted({int(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        raise BatchpilotError(f"world size must be an integer or a comma-separated list such as 1,2,4,8, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise BatchpilotError(f"world sizes must be integers >= 1, got {text!r}")
    if sizes[-1] > MAX_WORLD_SIZE:
        raise BatchpilotError(f"world sizes must be at most {MAX_WORLD_SIZE:,} ranks, got {text!r}")
    return tuple(sizes)


# -- measuring the all-reduce ---------------------------------------------------------------------
def _allreduce_worker(rank: int, world: int, store_path: str, out_path: str, sizes: list[int], repeats: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    medians = []  # (the best times, despite the name)
    for numel in sizes:
        t = torch.ones(numel)
        dist.all_reduce(t)  # warm-up (connections, buffers)
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        medians.append(min(times))  # the best of the repeats: what the link does when the machine lets it
    dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(medians, fh)


def measure_allreduce(grad_bytes: int, *, world_size: int = 2, repeats: int = 10, timeout_s: float = 120.0) -> CommModel:
    """Time gloo all-reduces between ``world_size`` local processes and fit bandwidth and latency.

    A tiny all-reduce (8 floats) gives the latency; one of ``max(grad_bytes, 4 MiB)`` (at most
    256 MiB) gives the bus bandwidth after the latency is taken off. Each is the best of ``repeats``
    (other jobs on a shared machine only slow it down). On one machine this is the loopback
    between processes, not a network: for a cluster, give the bandwidth instead.
    """
    import torch.multiprocessing as mp

    big = int(min(max(grad_bytes, 4 << 20), 256 << 20)) // 4
    sizes = [8, big]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        ctx = mp.start_processes(_allreduce_worker, args=(world_size, os.path.join(tmp, "store"), out, sizes, repeats),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise BatchpilotError(f"measuring the all-reduce took more than {timeout_s:.0f} s; give --allreduce-gbps")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        with open(out) as fh:
            t_small, t_big = json.load(fh)
    hops = 2 * (world_size - 1)
    latency = t_small / hops
    moved = hops / world_size * big * 4
    gbps = moved / max(t_big - t_small, 1e-9) / 1e9
    return CommModel(gradient_bytes=int(grad_bytes), bus_gbps=gbps, latency_s=latency,
                     source=f"measured: gloo all-reduce between {world_size} processes on this machine "
                            f"({big * 4 / 2**20:.0f} MiB: {t_big * 1e3:.2f} ms; 32 B: {t_small * 1e6:.0f} us)")


def comm_model(workload, *, allreduce_gbps: float | None = None, latency_s: float = 0.0) -> CommModel:
    """The all-reduce model for ``workload``: the given bandwidth, or one measured here."""
    nbytes = gradient_bytes(workload)
    if allreduce_gbps is not None:
        return CommModel(nbytes, float(allreduce_gbps), latency_s, f"given: {allreduce_gbps:g} GB/s bus bandwidth, "
                                                                   f"{latency_s * 1e6:g} us latency per hop")
    return measure_allreduce(nbytes)


# -- the table ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorldChoice:
    """The goodput-optimal configuration at one world size.

    Attributes:
        world_size, micro_batch_per_rank, accumulation_steps, global_batch: the split.
        step_s: predicted optimizer-step time, all-reduce included.
        allreduce_s: the all-reduce's share of it.
        samples_per_s, efficiency, goodput: as in :class:`batchpilot.plan.goodput.Candidate`.
        speedup: goodput over the goodput at the smallest world size listed.
        scaling_efficiency: ``speedup x smallest / world_size`` (1 = perfect scaling).
        time_to_target_s: predicted training time to the target, or ``None``.
    """

    world_size: int
    micro_batch_per_rank: int
    accumulation_steps: int
    global_batch: int
    step_s: float
    allreduce_s: float
    samples_per_s: float
    efficiency: float
    goodput: float
    speedup: float
    scaling_efficiency: float
    time_to_target_s: float | None


def compare_world_sizes(world_sizes: Sequence[int], best_at: Callable[[int], object],
                        comm: CommModel | None) -> tuple[list[WorldChoice], int]:
    """The best candidate at each world size and the recommended size.

    ``best_at(W)`` returns the goodput-optimal :class:`~batchpilot.plan.goodput.Candidate` at W. The
    recommendation is the smallest W whose goodput is within :data:`RECOMMEND_MARGIN` of the best: more
    ranks that add less than that are not worth their cost.
    """
    cands = [best_at(w) for w in world_sizes]
    first = cands[0]
    rows = []
    for w, c in zip(world_sizes, cands):
        speedup = c.goodput / first.goodput
        rows.append(WorldChoice(
            world_size=w, micro_batch_per_rank=c.micro_batch_per_rank, accumulation_steps=c.accumulation_steps,
            global_batch=c.global_batch, step_s=c.step_s, allreduce_s=comm.allreduce_s(w) if comm else 0.0,
            samples_per_s=c.samples_per_s, efficiency=c.efficiency, goodput=c.goodput, speedup=speedup,
            scaling_efficiency=speedup * world_sizes[0] / w, time_to_target_s=c.time_to_target_s))
    top = max(r.goodput for r in rows)
    recommended = min(r.world_size for r in rows if r.goodput >= (1 - RECOMMEND_MARGIN) * top)
    return rows, recommended


def elastic_splits(global_batch: int, world_sizes: Sequence[int], *, max_micro_batch: int | Callable[[int], int],
                   step_model: Callable[[int], object]) -> list[dict]:
    """How ``global_batch`` splits at each world size: the fastest micro-batch that fits and divides.

    ``step_model(W)`` returns a step-time model at W; ``max_micro_batch`` is one cap, or the cap at W
    (FSDP: the memory per rank changes with W). A world size that does not divide the global
    batch is listed as incompatible (the batch would have to change, and with it the LR and the plan).
    """
    out = []
    for w in world_sizes:
        per_rank, rem = divmod(global_batch, w)
        if rem or per_rank < 1:
            out.append({"world_size": w, "compatible": False,
                        "reason": f"{global_batch} does not divide over {w} ranks"})
            continue
        cap = max_micro_batch(w) if callable(max_micro_batch) else max_micro_batch
        divisors = [d for d in range(1, min(per_rank, cap) + 1) if per_rank % d == 0]
        if not divisors:
            out.append({"world_size": w, "compatible": False, "reason": f"no micro-batch fits at {w} ranks"})
            continue
        model = step_model(w)
        micro = min(divisors, key=lambda d: (model.step_s(d, per_rank // d), -d))  # type: ignore[attr-defined]
        step = model.step_s(micro, per_rank // micro)  # type: ignore[attr-defined]
        out.append({"world_size": w, "compatible": True, "micro_batch_per_rank": micro,
                    "accumulation_steps": per_rank // micro, "step_s": step, "samples_per_s": global_batch / step})
    return out


def compatible_world_sizes(global_batch: int, limit: int = MAX_LISTED_WORLD) -> list[int]:
    """World sizes (up to ``limit``) over which ``global_batch`` divides, so it can stay the same."""
    return [w for w in range(1, min(global_batch, limit) + 1) if global_batch % w == 0]
