"""What would change memory: activation checkpointing, bf16 autocast, gradient accumulation.

Each alternative is traced (checkpointing, AMP) or derived from the curve (accumulation),
and reported as plain data; rendering is the CLI's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from batchpilot.memory.api import memory_curve
from batchpilot.memory.curve import MemoryCurve
from batchpilot.memory.devices import DeviceSpec
from batchpilot.workloads import Workload


@dataclass(frozen=True)
class Scenario:
    """One alternative setting and what it does to memory.

    Attributes:
        name: e.g. ``"checkpointing"``.
        per_sample_bytes: bytes per sample of the micro-batch.
        peak_bytes: peak at ``at_batch``.
        at_batch: the batch the peak is quoted at.
        max_micro_batch: largest micro-batch on the device (0: batch 1 does not fit).
        note: what it costs or how it was obtained.
    """

    name: str
    per_sample_bytes: float
    peak_bytes: float
    at_batch: int
    max_micro_batch: int
    note: str = ""
    curve: MemoryCurve | None = None

    def to_dict(self) -> dict[str, object]:
        """Plain data (without the curve object)."""
        return {k: v for k, v in self.__dict__.items() if k != "curve"}


def accumulation_scenario(curve: MemoryCurve, device: DeviceSpec, global_batch: int, steps: int = 4) -> Scenario:
    """A global batch reached by accumulating micro-batches.

    If ``global_batch`` does not fit in one step, the micro-batch is the largest that fits;
    otherwise the global batch is split into ``steps`` micro-batches to show what
    accumulation saves. Gradient memory is the same at every batch (it equals parameter
    memory); only the activations shrink with the micro-batch, so the saving is the
    activation share of the peak (seeds/README.md, error 2).
    """
    m = curve.max_micro_batch(device.usable_bytes)
    if m and global_batch > m:
        micro = m
    else:
        micro = max(1, math.ceil(global_batch / steps))
    k = math.ceil(global_batch / micro)
    one = curve.peak_bytes(global_batch)
    acc = curve.peak_bytes(micro)
    saved = 1 - acc / one if one > 0 else 0.0
    fits = "" if not m or global_batch <= m else f" (one step of {global_batch} does not fit)"
    note = f"{k} x {micro} for global batch {global_batch}: peak {saved:.0%} lower{fits}; grads/optimizer state unchanged"
    return Scenario(f"accumulation x{k}", curve.per_sample_bytes, acc, micro, m, note)


def what_ifs(workload: Workload, curve: MemoryCurve, device: DeviceSpec, *, global_batch: int,
             batch_sizes: Sequence[int] | None = None) -> list[Scenario]:
    """The baseline, plus checkpointing, bf16 AMP and accumulation (those not already on)."""
    opts = dict(curve.options)
    base_dtype = str(opts.get("dtype", "float32"))
    base_amp = bool(opts.get("amp", False))
    base_ckpt = bool(opts.get("checkpointing", False))
    target = str(opts.get("target", "cpu"))
    impl = str(opts.get("optimizer_impl", "default"))
    at = global_batch
    out = [Scenario("as configured", curve.per_sample_bytes, curve.peak_bytes(at), at,
                    curve.max_micro_batch(device.usable_bytes), "", curve)]
    batches = list(batch_sizes) if batch_sizes is not None else sorted({at, max(curve.peak_bytes_at)})
    if len(batches) == 1:
        batches.append(2 * batches[0])
    alternatives = []
    if not base_ckpt:
        alternatives.append(("checkpointing", dict(checkpointing=True, amp=base_amp, dtype=base_dtype),
                             "recomputes blocks in backward (~1/3 more compute)"))
    if not base_amp and base_dtype == "float32":
        alternatives.append(("bf16 autocast", dict(checkpointing=base_ckpt, amp=True, dtype="bfloat16"),
                             "fp32 weights/optimizer state, bf16 activations"))
    for name, kw, note in alternatives:
        alt = memory_curve(workload, batch_sizes=batches, device=target, optimizer_impl=impl, **kw)
        out.append(Scenario(name, alt.per_sample_bytes, alt.peak_bytes(at), at,
                            alt.max_micro_batch(device.usable_bytes), note, alt))
    out.append(accumulation_scenario(curve, device, global_batch))
    return out
