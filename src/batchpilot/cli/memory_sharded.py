"""``batchpilot memory --strategy fsdp``: memory per rank under FSDP2 at one or several world sizes.

The options become :class:`~batchpilot.memory.sharding.ShardingConfig` objects (one per world size);
:func:`batchpilot.memory.sharded.memory_by_world` traces each, and the replicated (DDP) trace is run
once for comparison. JSON: ``per_rank`` (the largest world size listed: config, units, groups, curve),
``breakdown`` (its categories at the peak), ``by_world`` (one row per size) and ``replicated``.
"""

from __future__ import annotations

import argparse
from typing import Any

from batchpilot.cli.common import print_json
from batchpilot.errors import BatchpilotError
from batchpilot.memory import DeviceSpec, format_bytes
from batchpilot.memory.sharded import ShardedMemory, memory_by_world
from batchpilot.memory.sharding import ShardingConfig
from batchpilot.workloads import Workload


def sharding_from_args(args: argparse.Namespace) -> list[ShardingConfig]:
    """One config per ``--world-size`` entry (validated: a bad combination fails before any trace)."""
    from batchpilot.plan.worlds import parse_world_sizes

    given = getattr(args, "world_size", None)
    sizes = parse_world_sizes("1" if given is None else given)
    strategy = getattr(args, "strategy", "ddp")
    return [ShardingConfig(strategy, w, getattr(args, "reshard_after_forward", True), getattr(args, "cpu_offload", False))
            for w in sizes]


def world_row(memory: ShardedMemory, device: DeviceSpec) -> dict[str, Any]:
    """One world size: the largest micro-batch per rank and the peak split into its groups."""
    curve = memory.curve
    m = memory.max_micro_batch(device.usable_bytes)
    groups = memory.to_dict()["groups"]
    return {"world_size": memory.config.world_size, "max_micro_batch": m,
            "peak_bytes_at_max": curve.peak_bytes(m) if m else None, "batch1_peak_bytes": curve.peak_bytes(1),
            "fixed_bytes": curve.fixed_bytes, "per_sample_bytes": curve.per_sample_bytes,
            "host_bytes": memory.host_bytes, **{f"{k}_bytes": v for k, v in groups.items()}}


def sharded_result(workload: Workload, memories: dict[int, ShardedMemory], replicated: ShardedMemory,
                   device: DeviceSpec) -> dict[str, Any]:
    """The JSON document of a sharded memory run."""
    last = memories[max(memories)]
    row = world_row(last, device)
    rep = replicated.curve
    rep_max = rep.max_micro_batch(device.usable_bytes)
    notes = []
    if last.config.world_size == 1:
        notes.append("fsdp over one rank shards nothing: it is the replicated step plus FSDP's gather buffers")
    if last.config.cpu_offload:
        notes.append(f"the sharded states ({format_bytes(last.host_bytes)}) live in host memory, not on the device")
    return {
        "workload": workload.name, "strategy": last.config.strategy, "sharding": last.config.to_dict(),
        "describe": last.config.describe(), "device": device.name, "device_kind": device.kind,
        "device_memory_bytes": device.memory_bytes, "device_usable_bytes": device.usable_bytes,
        "units": last.to_dict()["units"], "unit_rule": "each entry of every nn.ModuleList (the blocks), then the root "
                                                        "with the remaining parameters (embeddings, final norm, head)",
        "breakdown": dict(last.curve.breakdown), "groups": last.to_dict()["groups"],
        "max_micro_batch": row["max_micro_batch"], "peak_bytes_at_max": row["peak_bytes_at_max"],
        "batch1_peak_bytes": row["batch1_peak_bytes"], "per_rank": last.to_dict(),
        "by_world": [world_row(m, device) for _, m in sorted(memories.items())],
        "replicated": {"strategy": "ddp", "max_micro_batch": rep_max, "batch1_peak_bytes": rep.peak_bytes(1),
                       "fits": rep.peak_bytes(1) <= device.usable_bytes, "breakdown": dict(rep.breakdown)},
        "notes": notes,
    }


def run_sharded(args: argparse.Namespace, workload: Workload, device: DeviceSpec, configs: list[ShardingConfig],
                batches: list[int] | None) -> int:
    """Trace, then print JSON or tables. Exit 0; a budget that holds no micro-batch anywhere is an error."""
    if args.probe:
        raise BatchpilotError("--probe runs one process and does not apply to --strategy fsdp")
    if args.out:
        raise BatchpilotError("--out is not written for --strategy fsdp yet; use --json")
    options = dict(dtype=args.dtype, amp=args.amp, checkpointing=args.checkpointing, device=device.kind,
                   seq_len=args.seq_len)
    first = configs[0]
    memories = memory_by_world(workload, [c.world_size for c in configs], strategy=first.strategy,
                               reshard_after_forward=first.reshard_after_forward, cpu_offload=first.cpu_offload,
                               batch_sizes=batches, **options)
    replicated = memory_by_world(workload, [1], strategy="ddp", batch_sizes=sorted(memories[max(memories)].curve.peak_bytes_at),
                                 **options)[1]
    data = sharded_result(workload, memories, replicated, device)
    if args.json:
        print_json(data)
    else:
        render_sharded(data)
    if not any(r["max_micro_batch"] for r in data["by_world"]):
        memories[max(memories)].curve.check_budget(device.usable_bytes, f"usable memory per rank on {device.name}")
    return 0


def render_sharded(data: dict[str, Any]) -> None:
    """Rich tables: the breakdown at the largest world size, then one row per world size."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    t = Table(title=f"batchpilot memory per rank: {data['workload']}, {data['describe']}")
    for col in ("category", "bytes", "share"):
        t.add_column(col, justify="left" if col == "category" else "right")
    total = sum(data["breakdown"].values())
    for k, v in data["breakdown"].items():
        t.add_row(k, format_bytes(v), f"{v / total:.1%}" if total else "-")
    t.add_row("total (largest traced batch)", format_bytes(total), "100%")
    console.print(t)
    console.print(f"FSDP units: {', '.join(data['units'])} ({data['unit_rule']})")
    w = Table(title=f"largest micro-batch per rank on {data['device']} ({format_bytes(data['device_usable_bytes'])} usable)")
    for col in ("ranks", "sharded states", "in flight", "B=1 peak", "per sample", "largest micro-batch"):
        w.add_column(col, justify="right")
    for r in data["by_world"]:
        w.add_row(str(r["world_size"]), format_bytes(r["sharded_states_bytes"]), format_bytes(r["in_flight_bytes"]),
                  format_bytes(r["batch1_peak_bytes"]), format_bytes(r["per_sample_bytes"]),
                  str(r["max_micro_batch"]) if r["max_micro_batch"] else "none fits")
    rep = data["replicated"]
    w.add_row("ddp", "-", "-", format_bytes(rep["batch1_peak_bytes"]), "-",
              str(rep["max_micro_batch"]) if rep["max_micro_batch"] else "none fits")
    console.print(w)
    for note in data["notes"]:
        console.print(f"note: {note}")
