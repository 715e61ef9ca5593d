"""Real measurement of a training step's peak allocations on CPU (the fallback and the bench's referee).

The c10 CPU allocator reports every allocation and free to the profiler when
``torch.profiler.profile(profile_memory=True)`` is active (``[memory]`` events with
signed byte counts, ``c10/core/CPUAllocator.cpp``). Replaying those events in time
order gives the exact live bytes of torch's CPU allocations at every moment, including
temporaries *inside* kernels, which a dispatch-level tracker cannot see. The model,
optimizer and batch are created inside the profiled window, so the running sum starts
from zero and its maximum is the step's absolute peak. Python objects and the
allocator's own slack (malloc headers, page rounding) are not counted.

Unlike :mod:`batchpilot.memory.trace`, this allocates the real batch: use it at small
batches (the fallback) or in benchmarks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from batchpilot.errors import BatchpilotError
from batchpilot.memory.options import autocast_context, build_step_objects, torch_dtype
from batchpilot.workloads import Workload
from batchpilot.workloads.common import preserved_host_rng
from batchpilot.memory.quiet import native_stderr_silenced

_TAG = "batchpilot::"
METHOD = "real measurement (CPU allocator events via torch.profiler)"


@dataclass(frozen=True)
class MeasuredStep:
    """Peak of torch's CPU allocations over two real training steps.

    Attributes:
        batch: micro-batch size.
        peak_bytes: the absolute peak (model, optimizer state, batch and step tensors).
        phase_peak_bytes: peak per phase (``step1.forward`` ...), as in the trace.
        seconds: wall time.
    """

    batch: int
    peak_bytes: int
    phase_peak_bytes: dict[str, int]
    seconds: float


def _real_batch(workload: Workload, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = workload.num_train
    items = [workload.train_data[i % n] for i in range(batch)]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def measure_step(workload: Workload, batch: int, *, dtype: str = "float32", amp: bool = False,
                 checkpointing: bool = False, optimizer_impl: str = "default") -> MeasuredStep:
    """Run two real training steps on CPU at ``batch`` and return the allocator-level peak.

    The global and host RNG states are restored afterwards; the workload's factories build
    fresh objects, so no user object is touched.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise BatchpilotError(f"batch must be a positive integer, got {batch!r}")
    param_dtype = torch_dtype(dtype)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), preserved_host_rng():
        with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model, optimizer = build_step_objects(workload, param_dtype, amp=amp, checkpointing=checkpointing,
                                                  optimizer_impl=optimizer_impl)
            x, y = _real_batch(workload, batch)
            if x.is_floating_point() and not amp:
                x = x.to(param_dtype)
            units = batch * max(1, math.prod(y.shape[1:]))
            for step in (1, 2):
                with record_function(f"{_TAG}step{step}.forward"), autocast_context(amp, dtype):
                    loss = workload.loss_sum(model(x), y) / units
                with record_function(f"{_TAG}step{step}.backward"):
                    loss.backward()
                    del loss
                with record_function(f"{_TAG}step{step}.optimizer"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            del model, optimizer, x, y
    kineto = list(prof.profiler.kineto_results.events())
    events = sorted((e.start_ns(), e.nbytes()) for e in kineto
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    ranges = sorted((e.start_ns(), e.end_ns(), e.name()[len(_TAG):]) for e in kineto if e.name().startswith(_TAG))
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return MeasuredStep(batch=batch, peak_bytes=peak, phase_peak_bytes=_phase_peaks(events, ranges),
                        seconds=time.perf_counter() - start)


def _phase_peaks(events: list[tuple[int, int]], ranges: list[tuple[int, int, str]]) -> dict[str, int]:
    """Peak live bytes inside each ``record_function`` range (same profiler clock as the events)."""
    out: dict[str, int] = {}
    live = 0
    i = 0
    for start, end, name in ranges:
        while i < len(events) and events[i][0] < start:
            live += events[i][1]
            i += 1
        peak = live
        while i < len(events) and events[i][0] <= end:
            live += events[i][1]
            peak = max(peak, live)
            i += 1
        out[name] = peak
    return out
