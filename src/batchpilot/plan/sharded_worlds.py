"""Plans under FSDP: the all-gather and reduce-scatter term of the step time, and FSDP set against DDP.

FSDP (Zhao et al. 2023; ZeRO stage 3, Rajbhandari et al. 2020) replaces DDP's one gradient all-reduce
per optimizer step with, for every micro-batch:

* an all-gather of each unit's parameters before its forward, in the compute dtype;
* another before its backward when the forward freed them (``reshard_after_forward``, ZeRO-3);
* a reduce-scatter of its gradients after its backward, in the reduce dtype (FSDP2 reduce-scatters
  every micro-batch unless told not to, which would keep whole unsharded gradients: the memory trace
  assumes it does).

A ring all-gather or reduce-scatter moves ``(W-1)/W`` of the bytes over each rank's link in ``W-1``
steps, half of a ring all-reduce (Patarasuk & Yuan 2009); NCCL's "bus bandwidth" uses the same
convention, so the all-reduce bandwidth of :mod:`.worlds` serves here too::

    per_micro_s(W) = (W-1)/W · ((1 + reshard) · param_bytes + grad_bytes) / bus_bandwidth
                     + (2 + reshard) · units · (W-1) · latency

The model adds it to the step without overlap (FSDP prefetches the next unit's all-gather during
the current unit's compute), so the predicted step time is an upper bound, as for DDP.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from batchpilot.errors import BatchpilotError
from batchpilot.plan.worlds import RECOMMEND_MARGIN, CommModel


@dataclass(frozen=True)
class ShardedCommModel:
    """FSDP's collectives per micro-batch.

    Attributes:
        param_bytes: bytes of all parameters in the all-gather dtype (the compute dtype).
        grad_bytes: bytes of all gradients in the reduce dtype.
        units: FSDP units (one collective each, per pass).
        reshard_after_forward: whether the backward all-gathers again.
        bus_gbps, latency_s, source: the link, as in :class:`~batchpilot.plan.worlds.CommModel`.
    """

    param_bytes: int
    grad_bytes: int
    units: int
    reshard_after_forward: bool
    bus_gbps: float
    latency_s: float
    source: str

    def __post_init__(self) -> None:
        if self.param_bytes < 0 or self.grad_bytes < 0:
            raise BatchpilotError(f"collective bytes must be >= 0, got {self.param_bytes}, {self.grad_bytes}")
        if self.units < 1:
            raise BatchpilotError(f"an FSDP model has at least one unit, got {self.units}")
        if not (self.bus_gbps > 0 and math.isfinite(self.bus_gbps)):
            raise BatchpilotError(f"bus bandwidth must be a positive number of GB/s, got {self.bus_gbps!r}")
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise BatchpilotError(f"latency must be >= 0 seconds, got {self.latency_s!r}")

    def volume_bytes(self, world_size: int) -> dict[str, float]:
        """Bytes each rank sends per micro-batch, by collective (0 on one rank)."""
        if world_size < 1:
            raise BatchpilotError(f"world size must be >= 1, got {world_size}")
        share = (world_size - 1) / world_size
        return {"all_gather_forward_bytes": share * self.param_bytes,
                "all_gather_backward_bytes": share * self.param_bytes if self.reshard_after_forward else 0.0,
                "reduce_scatter_bytes": share * self.grad_bytes}

    def per_micro_s(self, world_size: int) -> float:
        """Seconds of collectives per micro-batch at ``world_size`` ranks."""
        if world_size <= 1:
            return 0.0
        calls = (2 + int(self.reshard_after_forward)) * self.units
        return sum(self.volume_bytes(world_size).values()) / (self.bus_gbps * 1e9) \
            + calls * (world_size - 1) * self.latency_s

    def to_dict(self) -> dict:
        """Plain data."""
        return asdict(self)


def sharded_comm(comm: CommModel, *, param_bytes: int, grad_bytes: int, units: int,
                 reshard_after_forward: bool) -> ShardedCommModel:
    """FSDP's collectives on the link ``comm`` describes (its bandwidth and latency)."""
    return ShardedCommModel(param_bytes=int(param_bytes), grad_bytes=int(grad_bytes), units=int(units),
                            reshard_after_forward=reshard_after_forward, bus_gbps=comm.bus_gbps,
                            latency_s=comm.latency_s, source=comm.source)


@dataclass(frozen=True)
class ShardedStepTime:
    """A step-time model plus FSDP's collectives, once per micro-batch: ``step_s(micro, accumulation)``."""

    base: object
    per_micro_comm_s: float

    def step_s(self, micro_batch: int, accumulation_steps: int = 1) -> float:
        return self.base.step_s(micro_batch, accumulation_steps) \
            + accumulation_steps * self.per_micro_comm_s  # type: ignore[attr-defined]


def compare_strategies(world_sizes: Sequence[int], best_fsdp: Callable[[int], object | None],
                       best_ddp: Callable[[int], object | None], comm: ShardedCommModel, ddp_comm: CommModel,
                       max_micro: dict[int, int], ddp_max_micro: int) -> tuple[list[dict], int]:
    """The best FSDP candidate at each world size beside DDP's where DDP fits, and the recommended size.

    ``best_fsdp(W)``/``best_ddp(W)`` return a goodput-optimal candidate, or ``None`` where nothing fits.
    The recommendation is the smallest W whose FSDP goodput is within :data:`RECOMMEND_MARGIN` of the best.

    Raises:
        BatchpilotError: no world size holds even a micro-batch of 1 under FSDP.
    """
    rows = []
    for w in world_sizes:
        c = best_fsdp(w) if max_micro.get(w, 0) > 0 else None
        d = best_ddp(w) if ddp_max_micro > 0 else None
        row: dict = {"world_size": w, "fits": c is not None, "max_micro_batch_per_rank": max_micro.get(w, 0),
                     "ddp_max_micro_batch_per_rank": ddp_max_micro, **comm.volume_bytes(w)}
        if c is not None:
            row.update(micro_batch_per_rank=c.micro_batch_per_rank, accumulation_steps=c.accumulation_steps,
                       global_batch=c.global_batch, step_s=c.step_s,
                       comm_s=c.accumulation_steps * comm.per_micro_s(w), allreduce_s=0.0,
                       samples_per_s=c.samples_per_s, efficiency=c.efficiency, goodput=c.goodput,
                       time_to_target_s=c.time_to_target_s, peak_bytes=c.peak_bytes)
        row["ddp"] = None if d is None else {
            "micro_batch_per_rank": d.micro_batch_per_rank, "accumulation_steps": d.accumulation_steps,
            "global_batch": d.global_batch, "step_s": d.step_s, "allreduce_s": ddp_comm.allreduce_s(w),
            "goodput": d.goodput, "time_to_target_s": d.time_to_target_s}
        rows.append(row)
    fitting = [r for r in rows if r["fits"]]
    if not fitting:
        raise BatchpilotError(f"under FSDP not even a micro-batch of 1 fits at world sizes {list(world_sizes)}; "
                              "try more ranks, --checkpointing or a shorter sequence")
    top = max(r["goodput"] for r in fitting)
    first = fitting[0]
    for r in fitting:
        r["speedup"] = r["goodput"] / first["goodput"]
        r["scaling_efficiency"] = r["speedup"] * first["world_size"] / r["world_size"]
        ddp = r["ddp"]
        r["faster"] = ("fsdp" if ddp is None or r["goodput"] > ddp["goodput"] else
                       "same" if r["goodput"] == ddp["goodput"] else "ddp")
    recommended = min(r["world_size"] for r in fitting if r["goodput"] >= (1 - RECOMMEND_MARGIN) * top)
    return rows, recommended


@dataclass(frozen=True)
class FsdpMemory:
    """The traced memory per rank at each planned world size (:func:`batchpilot.memory.sharded.memory_by_world`).

    Attributes:
        memories: world size -> :class:`~batchpilot.memory.sharded.ShardedMemory`.
        max_micro: world size -> the largest micro-batch per rank that fits (0: none).
        reshard_after_forward: the FSDP mode traced.
    """

    memories: dict
    max_micro: dict[int, int]
    reshard_after_forward: bool

    def __post_init__(self) -> None:
        if set(self.memories) != set(self.max_micro) or not self.memories:
            raise BatchpilotError("FsdpMemory needs one largest micro-batch per traced world size")

    @property
    def units(self) -> tuple[str, ...]:
        """The FSDP units (``""`` is the root)."""
        return next(iter(self.memories.values())).units


def fsdp_memory(workload, world_sizes: Sequence[int], spec, *, reshard_after_forward: bool = True,
                amp: bool = False) -> FsdpMemory:
    """Trace the memory per rank at each world size for the device ``spec`` (a :class:`DeviceSpec`).

    With ``amp``, fp32 sharded master weights and FSDP's bf16 mixed precision for the gathered parameters
    and the compute (:func:`batchpilot.memory.sharded_trace.trace_sharded_step`).

    Raises:
        BatchpilotError: no world size holds a micro-batch of 1.
    """
    from batchpilot.memory.sharded import max_micro_by_world, memory_by_world

    memories = memory_by_world(workload, world_sizes, strategy="fsdp", reshard_after_forward=reshard_after_forward,
                               amp=amp,
                               device="cuda" if spec.kind == "cuda" else "cpu")
    max_micro = max_micro_by_world(memories, spec.usable_bytes)
    if not any(max_micro.values()):
        need = min(m.curve.peak_bytes(1) for m in memories.values())
        raise BatchpilotError(f"under FSDP not even a micro-batch of 1 fits the usable memory of {spec.name} "
                              f"({spec.usable_bytes} B) at world sizes {sorted(memories)} (least batch-1 peak "
                              f"{int(need)} B); try more ranks or --checkpointing")
    return FsdpMemory(memories=memories, max_micro=max_micro, reshard_after_forward=reshard_after_forward)


def fsdp_worlds(sharded: FsdpMemory, comm: CommModel, world_sizes: Sequence[int], *, curve, usable_bytes: float,
                common: dict, micro_choices: Sequence[int], max_global_batch: int, b_noise: float,
                throughput) -> tuple[Callable[[int], ShardedStepTime], dict, int]:
    """The goodput search under FSDP at each world size, with DDP beside it where the replicated step fits.

    Returns ``(step model at W, the plan's worlds section, the recommended world size)``.
    """
    from batchpilot.plan import goodput as gp

    grad_bytes = int(comm.gradient_bytes)
    scomm = sharded_comm(comm, param_bytes=grad_bytes, grad_bytes=grad_bytes, units=len(sharded.units),
                         reshard_after_forward=sharded.reshard_after_forward)

    def step(w: int) -> ShardedStepTime:
        return ShardedStepTime(throughput, scomm.per_micro_s(w))

    def best(w: int, max_micro: int, memory, step_model) -> object | None:
        found = gp.search(micro_choices=micro_choices, world_size=w, max_micro_batch=max_micro,
                          max_global_batch=max_global_batch, b_noise=b_noise,
                          **{**common, "throughput": step_model, "memory": memory})
        return gp.choose(found, throughput) if found else None

    from batchpilot.plan.worlds import StepTimeWithComm

    ddp_max = curve.max_micro_batch(usable_bytes)
    rows, recommended = compare_strategies(
        world_sizes, lambda w: best(w, sharded.max_micro[w], sharded.memories[w].curve, step(w)),
        lambda w: best(w, ddp_max, curve, StepTimeWithComm(throughput, comm.allreduce_s(w))),
        scomm, comm, sharded.max_micro, ddp_max)
    info = {"strategy": "fsdp", "reshard_after_forward": sharded.reshard_after_forward,
            "world_sizes": list(world_sizes), "recommended": recommended, "recommend_margin": RECOMMEND_MARGIN,
            "table": [r for r in rows if r["fits"]], "not_fitting": [r["world_size"] for r in rows if not r["fits"]],
            "units": ["<root>" if u == "" else u for u in sharded.units], "sharded_comm": scomm.to_dict(),
            "memory_per_rank": {str(w): {**m.to_dict()["groups"], "batch1_peak_bytes": m.curve.peak_bytes(1),
                                         "per_sample_bytes": m.curve.per_sample_bytes}
                                for w, m in sorted(sharded.memories.items())},
            "comm": comm.to_dict()}
    return step, info, recommended


def fsdp_caveats(worlds: dict, world_size: int) -> list[str]:
    """What a reader of an FSDP plan should know: the collectives' model, and DDP where it is predicted faster."""
    out = []
    if world_size > 1:
        again = " and again before the backward" if worlds.get("reshard_after_forward") else ""
        out.append(f"fsdp over {world_size} ranks: each micro-batch all-gathers the parameters before the forward{again} "
                   f"and reduce-scatters the gradients ({worlds['comm']['source']}), counted without overlap with "
                   "compute, so the step time is an upper bound.")
    row = next((r for r in worlds.get("table", []) if r["world_size"] == world_size), None)
    if row and row.get("faster") == "ddp":
        out.append(f"at {world_size} ranks DDP also fits and is predicted faster (goodput {row['ddp']['goodput']:.0f} "
                   f"against {row['goodput']:.0f}): sharding saves memory this model does not need there.")
    return out
