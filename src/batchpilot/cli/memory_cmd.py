"""``batchpilot memory``: peak training-step memory M(B), its breakdown and the largest micro-batch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from batchpilot.cli.common import add_dtype_arg, add_workload_args, load_workload, print_json, workload_name
from batchpilot.errors import BatchpilotError
from batchpilot.files import atomic_write_json
from batchpilot.memory import DeviceSpec, MemoryCurve, format_bytes, memory_curve, resolve_device
from batchpilot.memory.curve import MAX_MICRO_BATCH
from batchpilot.memory.options import DTYPES
from batchpilot.workloads import REGISTRY, Workload


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="predict peak training memory M(B) and the largest micro-batch on a device",
                       description="Trace one full training step with fake tensors (nothing is allocated), fit "
                                   "M(B) = fixed + per_sample * B and find the largest micro-batch on a device.")
    add_workload_args(p)
    dev = p.add_argument_group("target device")
    dev.add_argument("--device", default=None, metavar="DEVICE",
                     help="cpu, cuda (this GPU), a GPU name (H100, A100-40GB, 'RTX 4090' ...) or a size (default: cpu)")
    dev.add_argument("--memory", default=None, metavar="SIZE",
                     help="device total memory, e.g. 24GiB (overrides the table; alone it means a GPU of that size; "
                          "default: the device's)")
    add_dtype_arg(p, DTYPES, "parameter dtype (or the autocast dtype with --amp)")
    p.add_argument("--amp", action="store_true", help="autocast with fp32 weights")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="sequence length of sequence models (default: the workload's)")
    p.add_argument("--batch-sizes", default=None, metavar="B[,B...]",
                   help="traced micro-batches, e.g. 8,16,32 (default 1,4,16,... until the slope settles)")
    p.add_argument("--global-batch", type=int, default=None, metavar="N",
                   help="global batch for the accumulation what-if (default: the workload's base batch)")
    p.add_argument("--no-what-if", action="store_true", help="skip the checkpointing/bf16 what-if traces")
    p.add_argument("--probe", action="store_true", help="confirm the largest micro-batch with real steps (needs CUDA)")
    shard = p.add_argument_group("data parallelism (memory per rank)")
    shard.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                       help="ddp: replicated states (default); fsdp: FSDP2 fully_shard, states sharded over the ranks")
    shard.add_argument("--world-size", default="1", metavar="N[,N...]",
                       help="data-parallel ranks, or a list such as 1,2,4,8 (one row per size; default 1)")
    shard.add_argument("--reshard-after-forward", action=argparse.BooleanOptionalAction, default=True,
                       help="fsdp: free each block's gathered parameters after its forward and gather them again in "
                            "the backward (ZeRO-3, default); --no-reshard-after-forward keeps them (ZeRO-2-like)")
    shard.add_argument("--cpu-offload", action="store_true",
                       help="fsdp: keep sharded parameters, gradients and optimizer state in host memory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory for memory.json, memory.png and memory.html (default: write nothing)")
    p.set_defaults(func=run)


def _load(args: argparse.Namespace) -> Workload:
    import batchpilot.memory.hf as hf  # registers hf:gpt2 / hf:bert-base / hf:bert-large

    name = workload_name(args)
    if name.startswith("hf:") and name not in REGISTRY:
        from batchpilot.cli.common import workload_options

        return hf.load_hf_workload(name, **workload_options(args))
    return load_workload(args, "memory")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


MAX_BATCH = 10**12
"""The largest batch ``--batch-sizes`` and ``--global-batch`` take (beyond any device; far from int64 overflow)."""


def _batches(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise BatchpilotError(f"--batch-sizes must be comma-separated integers, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise BatchpilotError(f"--batch-sizes must be positive integers, got {text!r}")
    if max(values) > MAX_BATCH:  # a tensor dimension past int64 made the trace fail and the sizes be ignored
        raise BatchpilotError(f"--batch-sizes must be at most {MAX_BATCH:,}, got {text!r}")
    return values


def result_dict(workload: Workload, curve: MemoryCurve, device: DeviceSpec, scenarios: list, probe: Any) -> dict:
    """The JSON document of a memory run."""
    m = curve.max_micro_batch(device.usable_bytes)
    seq = curve.seq_len
    return {
        "workload": workload.name, **curve.to_dict(),
        "per_token_bytes": curve.per_sample_bytes / seq if seq else None,
        "device": device.name, "device_kind": device.kind, "device_memory_bytes": device.memory_bytes,
        "device_usable_bytes": device.usable_bytes, "device_overheads": {
            "cuda_context_bytes": device.context_bytes, "workspace_bytes": device.workspace_bytes,
            "margin_frac": device.margin_frac},
        "max_micro_batch": m, "peak_bytes_at_max": curve.peak_bytes(m) if m else None,
        "batch1_peak_bytes": curve.peak_bytes(1),
        "what_if": [s.to_dict() for s in scenarios],
        "probe": None if probe is None else {
            "max_micro_batch": probe.max_micro_batch, "first_failing": probe.first_failing,
            "predicted_micro_batch": probe.predicted_micro_batch, "oom_count": probe.oom_count,
            "trials": [t.__dict__ for t in probe.trials]},
    }


def run(args: argparse.Namespace) -> int:
    from batchpilot.cli.outputs import check_out_dir

    check_out_dir(args.out)
    device = resolve_device(args.device, args.memory)
    if args.probe and not _cuda_visible():  # before the trace: nothing has been printed yet
        raise BatchpilotError("--probe runs real training steps and needs a CUDA device; none is visible here. "
                              "Without --probe, batchpilot memory predicts M(B) from the fake-tensor trace alone "
                              "(no GPU needed)")
    batches = _batches(args.batch_sizes)
    from batchpilot.cli.memory_sharded import sharding_from_args

    sharding = sharding_from_args(args)
    for flag, value in (("--global-batch", args.global_batch), ("--seq-len", args.seq_len)):
        if value is not None and value < 1:
            raise BatchpilotError(f"{flag} must be a positive integer, got {value}")
        if value is not None and value > MAX_BATCH:
            raise BatchpilotError(f"{flag} must be at most {MAX_BATCH:,}, got {value}")
    workload = _load(args)
    if sharding[0].sharded:
        from batchpilot.cli.memory_sharded import run_sharded

        return run_sharded(args, workload, device, sharding, batches)
    global_batch = args.global_batch if args.global_batch is not None else workload.base_batch
    curve = memory_curve(workload, batch_sizes=batches, dtype=args.dtype, amp=args.amp,
                         checkpointing=args.checkpointing, device=device.kind, seq_len=args.seq_len)
    fits = curve.peak_bytes(1) <= device.usable_bytes
    scenarios: list = []
    if fits:
        from batchpilot.memory.whatif import accumulation_scenario, what_ifs

        if args.no_what_if:
            scenarios = [accumulation_scenario(curve, device, global_batch)]
        else:
            scenarios = what_ifs(workload if args.seq_len is None else _with_seq(workload, args.seq_len), curve,
                                 device, global_batch=global_batch)
    probe = None
    if args.probe and fits:
        from batchpilot.memory.probe import probe_workload

        probe = probe_workload(_with_seq(workload, args.seq_len), curve.max_micro_batch(device.usable_bytes),
                               device="cuda", dtype=args.dtype, amp=args.amp, checkpointing=args.checkpointing)
    data = result_dict(workload, curve, device, scenarios, probe)
    data["sharding"] = sharding[-1].to_dict()  # ddp: every rank holds the model, so this is the memory per rank
    failed = None
    if args.out:
        from batchpilot.cli.common import _clean
        from batchpilot.cli.outputs import save_or_fallback

        failed = save_or_fallback(lambda: _write_outputs(Path(args.out), workload, curve, device, scenarios, data),
                                  _clean(data), verb="memory", what=f"{args.out}/memory.json", name="memory.json")
    if args.json:
        if not fits:
            curve.check_budget(device.usable_bytes, f"usable memory on {device.name}")
        print_json(data)
    else:
        render(workload, curve, device, scenarios, probe, out=args.out if not failed else None)
        if not fits:
            curve.check_budget(device.usable_bytes, f"usable memory on {device.name}")
    if failed:
        from batchpilot.cli.outputs import report_write_failure

        report_write_failure("memory", failed)
        return 2
    return 0


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _with_seq(workload: Workload, seq_len: int | None) -> Workload:
    from batchpilot.memory import with_seq_len

    return with_seq_len(workload, seq_len)


def _write_outputs(out: Path, workload: Workload, curve: MemoryCurve, device: DeviceSpec, scenarios: list,
                   data: dict) -> None:
    from batchpilot.memory.plot import save_memory_plot
    from batchpilot.report.memory_report import write_memory_report

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "memory.json", data, allow_nan=True)
    extra = [(s.name, s.curve) for s in scenarios if s.curve is not None and s.name != "as configured"]
    save_memory_plot(out / "memory.png", curve, device, f"{workload.name}: M(B) on {device.name}", extra)
    write_memory_report(out / "memory.html", workload.name, curve, device, scenarios, extra)


def render(workload: Workload, curve: MemoryCurve, device: DeviceSpec, scenarios: list, probe: Any,
           out: str | None = None) -> None:
    """Rich tables: breakdown, curve, device, what-ifs, probe."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    largest = max(curve.peak_bytes_at)
    t = Table(title=f"batchpilot memory: {workload.name}, peak at B={largest} "
                    f"({curve.peak_phase_at.get(largest, '?')})")
    for col in ("category", "bytes", "share"):
        t.add_column(col, justify="left" if col == "category" else "right")
    total = sum(curve.breakdown.values())
    for k, v in curve.breakdown.items():
        t.add_row(k, format_bytes(v), f"{v / total:.1%}" if total else "-")
    t.add_row("total", format_bytes(total), "100%")
    console.print(t)
    m = curve.max_micro_batch(device.usable_bytes)
    c = Table(show_header=False, title="M(B) and device")
    c.add_row("fit", f"M(B) = {format_bytes(curve.fixed_bytes)} + {format_bytes(curve.per_sample_bytes)} x B "
              f"for large B; between traced batches, interpolated (B=1: {format_bytes(curve.peak_bytes(1))})")
    c.add_row("bytes per sample", format_bytes(curve.per_sample_bytes)
              + (f" ({format_bytes(curve.per_sample_bytes / curve.seq_len)} per token at seq_len {curve.seq_len})" if curve.seq_len else ""))
    c.add_row("traced", ", ".join(f"B={b}: {format_bytes(v)}" for b, v in sorted(curve.peak_bytes_at.items())))
    c.add_row("method", f"{curve.method}; worst residual {curve.residual_frac:.2%}; {curve.trace_seconds:.1f} s")
    c.add_row("device", device.describe())
    capped = " — the cap: the device holds more than any batch needs" if m == MAX_MICRO_BATCH else ""
    c.add_row("largest micro-batch", f"{m}  (peak {format_bytes(curve.peak_bytes(m))}){capped}" if m else "none fits")
    console.print(c)
    if scenarios:
        w = Table(title="what would change it")
        for col in ("setting", "bytes/sample", "peak", "largest micro-batch", "note"):
            w.add_column(col)
        for s in scenarios:
            w.add_row(s.name, format_bytes(s.per_sample_bytes), f"{format_bytes(s.peak_bytes)} at B={s.at_batch}",
                      "none fits" if s.max_micro_batch is None else str(s.max_micro_batch), s.note or "")
        console.print(w)
    if probe is not None:
        pt = Table(title=f"probe on the device: largest micro-batch {probe.max_micro_batch} "
                         f"(predicted {probe.predicted_micro_batch}, {probe.oom_count} OOM)")
        for col in ("micro-batch", "fits", "peak allocated", "s"):
            pt.add_column(col)
        for tr in probe.trials:
            pt.add_row(str(tr.micro_batch), "yes" if tr.fits else "OOM",
                       format_bytes(tr.peak_bytes) if tr.peak_bytes else "-", f"{tr.seconds:.2f}")
        console.print(pt)
    if out:
        console.print(f"wrote {out}/memory.json, memory.png, memory.html")
