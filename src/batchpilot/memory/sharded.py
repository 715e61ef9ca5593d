"""Memory per rank under sharded data parallelism: M_N(B) at each world size N, and the largest micro-batch.

Under FSDP (Zhao et al. 2023) the per-rank peak is, at its moment,

    sharded states / N  +  units in flight  +  activations(B)  +  temporaries(B)

(ZeRO stage 3, Rajbhandari et al. 2020: parameters, gradients and optimizer state partitioned over
the N data-parallel ranks). The states fall as ``1/N``; what is gathered stays (one or two units, the
root kept); activations and temporaries are per sample and do not shard at all. Each M_N(B) is
traced (:func:`batchpilot.memory.sharded_trace.trace_sharded_step`) at the ladder of batches
:func:`batchpilot.memory.api.memory_curve` uses, and fitted the same way (:mod:`batchpilot.memory.curve`),
so ``max_micro_batch`` and ``peak_bytes`` mean the same as for one device.

``strategy="ddp"`` is the replicated trace of :func:`memory_curve` at any N (DDP's gradient buckets,
one gradient's size more, are not counted there either).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Sequence

from batchpilot.errors import BatchpilotError
from batchpilot.memory.api import (LADDER_RATIO, MAX_TRACES, _target_kind, batches_to_trace, slope_settled,
                                   with_seq_len)
from batchpilot.memory.curve import MemoryCurve, fit_curve
from batchpilot.memory.options import DTYPES
from batchpilot.memory.sharded_trace import IN_FLIGHT, SHARDED_STATES, ShardedStepTrace, trace_sharded_step
from batchpilot.memory.sharding import ShardingConfig, fsdp_tracing_available
from batchpilot.workloads import Workload


@dataclass(frozen=True)
class ShardedMemory:
    """One rank's M(B) under a sharding config, with the breakdown at its largest traced batch.

    Attributes:
        config: the sharding config traced.
        curve: the per-rank memory curve (``curve.breakdown`` uses the sharded categories).
        units: the FSDP units (``""`` is the root); empty for ddp.
        host_bytes: host memory the offloaded sharded states take (``cpu_offload``), else 0.
    """

    config: ShardingConfig
    curve: MemoryCurve
    units: tuple[str, ...] = ()
    host_bytes: int = 0

    def __post_init__(self) -> None:
        if self.host_bytes < 0:
            raise BatchpilotError(f"host bytes must be >= 0, got {self.host_bytes}")
        if self.config.sharded and not self.units:
            raise BatchpilotError("an fsdp ShardedMemory needs its units")

    @property
    def sharded_state_bytes(self) -> int:
        """Sharded parameters, gradients and optimizer state at the peak (per rank)."""
        return sum(int(self.curve.breakdown.get(k, 0)) for k in SHARDED_STATES)

    @property
    def in_flight_bytes(self) -> int:
        """Unsharded (gathered) parameters and unsharded gradients at the peak."""
        return sum(int(self.curve.breakdown.get(k, 0)) for k in IN_FLIGHT)

    def max_micro_batch(self, usable_bytes: float) -> int:
        """The largest micro-batch per rank that fits ``usable_bytes`` (0: none)."""
        return self.curve.max_micro_batch(usable_bytes)

    def to_dict(self) -> dict[str, object]:
        """Plain data: the config, the groups, the units and the curve."""
        b = self.curve.breakdown
        return {**self.config.to_dict(), "describe": self.config.describe(),
                "units": ["<root>" if u == "" else u for u in self.units],
                "groups": {"sharded_states": self.sharded_state_bytes, "in_flight": self.in_flight_bytes,
                           "activations": int(b.get("activations", 0)), "temporaries": int(b.get("temporaries", 0)),
                           "inputs": int(b.get("inputs", 0)) + int(b.get("buffers", 0))},
                "host_bytes": self.host_bytes, "curve": self.curve.to_dict()}


def sharded_memory(workload: Workload, config: ShardingConfig, *, batch_sizes: Sequence[int] | None = None,
                   dtype: str = "float32", amp: bool = False, checkpointing: bool = False, device: str = "cpu",
                   seq_len: int | None = None, optimizer_impl: str = "default") -> ShardedMemory:
    """Trace one rank's step under ``config`` at a ladder of micro-batches and fit its M(B).

    Arguments are those of :func:`batchpilot.memory.api.memory_curve`; ``batch_sizes`` are micro-batches
    per rank. A ``ddp`` config returns the replicated curve.

    Raises:
        BatchpilotError: bad options, a model the trace cannot run, or a torch without FSDP2's tracker
            (there is no fallback: a real measurement of FSDP needs several processes).
    """
    if dtype not in DTYPES:
        raise BatchpilotError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not config.sharded:
        from batchpilot.memory.api import memory_curve

        curve = memory_curve(workload, batch_sizes=batch_sizes, dtype=dtype, amp=amp, checkpointing=checkpointing,
                             device=device, seq_len=seq_len, optimizer_impl=optimizer_impl)
        return ShardedMemory(config=config, curve=curve)
    if not fsdp_tracing_available():
        raise BatchpilotError("this torch lacks FSDP2's fully_shard, FSDPMemTracker or the fake process group "
                              "(torch >= 2.6): cannot trace --strategy fsdp")
    workload = with_seq_len(workload, seq_len)
    target = _target_kind(device)
    batches = batches_to_trace(workload, batch_sizes)
    start = time.perf_counter()

    def one(b: int) -> ShardedStepTrace:
        try:
            return trace_sharded_step(workload, b, config, dtype=dtype, amp=amp, checkpointing=checkpointing,
                                      target=target, optimizer_impl=optimizer_impl)
        except BatchpilotError:
            raise
        except Exception as exc:  # noqa: BLE001 - an untraceable model: say so in one line
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise BatchpilotError(f"workload {workload.name!r}: the fake-tensor FSDP trace failed at micro-batch {b} "
                                  f"({type(exc).__name__}: {first}); there is no fallback for --strategy fsdp") from exc

    traces = [one(b) for b in batches]
    while (batch_sizes is None and len(traces) < MAX_TRACES
           and not slope_settled([(t.batch, t.peak_bytes) for t in traces])):
        traces.append(one(traces[-1].batch * LADDER_RATIO))
    fb = [max((v for k, v in t.phase_peak_bytes.items() if k.endswith(("forward", "backward"))), default=0)
          for t in traces]
    opt = [max((v for k, v in t.phase_peak_bytes.items() if k.endswith("optimizer")), default=0) for t in traces]
    options = {"dtype": dtype, "amp": amp, "checkpointing": checkpointing, "target": target,
               "optimizer_impl": optimizer_impl, **config.to_dict()}
    curve = fit_curve([t.batch for t in traces], fb, opt, [t.peak_bytes for t in traces],
                      breakdown=dict(traces[-1].breakdown), method=traces[0].method,
                      peak_phase_at={t.batch: t.peak_phase for t in traces}, seq_len=workload.seq_len,
                      options=options, trace_seconds=time.perf_counter() - start)
    return ShardedMemory(config=config, curve=curve, units=traces[0].units,
                         host_bytes=max(t.host_bytes for t in traces))


def memory_by_world(workload: Workload, world_sizes: Sequence[int], *, strategy: str = "fsdp",
                    reshard_after_forward: bool = True, cpu_offload: bool = False,
                    **options: object) -> dict[int, ShardedMemory]:
    """:func:`sharded_memory` at each world size; after the first, the ladder the first one settled on is reused."""
    out: dict[int, ShardedMemory] = {}
    batches = options.pop("batch_sizes", None)
    if strategy == "ddp":  # replicated: the same trace at every world size
        first = sharded_memory(workload, ShardingConfig("ddp", 1), batch_sizes=batches, **options)  # type: ignore[arg-type]
        return {w: dataclasses.replace(first, config=ShardingConfig("ddp", w)) for w in sorted(set(world_sizes))}
    for w in sorted(set(world_sizes)):
        config = ShardingConfig(strategy, w, reshard_after_forward, cpu_offload)
        out[w] = sharded_memory(workload, config, batch_sizes=batches, **options)  # type: ignore[arg-type]
        batches = batches or sorted(out[w].curve.peak_bytes_at)
    return out


def max_micro_by_world(memories: dict[int, ShardedMemory], usable_bytes: float) -> dict[int, int]:
    """World size -> the largest micro-batch per rank that fits (0 where none does)."""
    return {w: m.max_micro_batch(usable_bytes) for w, m in sorted(memories.items())}
