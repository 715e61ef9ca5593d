"""Trace the memory of one complete training step with fake tensors: nothing is allocated.

A separate model and optimizer are built from the workload's factories under
``FakeTensorMode`` (the user's objects are never touched), then two full steps run
under PyTorch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``, torch >= 2.5):

    step 1: forward, backward, optimizer step (creates the optimizer state), zero_grad
    step 2: forward, backward, optimizer step (steady state), zero_grad

The loss is computed as the trainer does (``loss_sum(model(x), y) / units``, the
output is not kept), and grads are set to ``None`` after each step as the trainer does.
``MemTracker`` records the live bytes after every aten op, by category (parameters,
buffers, gradients, optimizer state, activations, backward temporaries, inputs).
We read its peak after each phase and reset it, so every phase has its own peak.

``MemTracker`` is private API: :func:`mem_tracker_available` guards it by version and
by the attributes used here; callers fall back to :mod:`batchpilot.memory.measure`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from batchpilot.errors import BatchpilotError
from batchpilot.memory.options import autocast_context, build_step_objects, cuda_attention, torch_dtype
from batchpilot.memory.workspace import CpuKernelWorkspace
from batchpilot.workloads import Workload
from batchpilot.workloads.common import preserved_host_rng

PHASES = ("step1.forward", "step1.backward", "step1.optimizer", "step2.forward", "step2.backward", "step2.optimizer")
"""Phases of the traced step pair; ``step1.optimizer`` includes the optimizer-state creation."""
CATEGORIES = ("params", "grads", "optimizer_state", "activations", "temporaries", "inputs")
_CATEGORY_OF = {"Parameter": "params", "Buffer": "params", "Gradient": "grads", "Optstate": "optimizer_state",
                "Activation": "activations", "Temp": "temporaries", "Other": "inputs"}
CUDA_MIN_BLOCK_BYTES = 512
"""The CUDA caching allocator rounds every block up to 512 bytes (c10/cuda/CUDACachingAllocator.cpp)."""
METHOD = "fake-tensor mem_tracker"


@dataclass(frozen=True)
class StepTrace:
    """Peak memory of one traced training step pair at one micro-batch.

    Attributes:
        batch: micro-batch size.
        peak_bytes: the peak over all phases.
        breakdown: bytes by category at that peak (keys :data:`CATEGORIES`).
        peak_phase: the phase the peak falls in (one of :data:`PHASES`).
        phase_peak_bytes: each phase's own peak.
        phase_end_breakdown: live bytes by category at the end of each phase.
        method: how it was measured.
        seconds: wall time of the trace.
    """

    batch: int
    peak_bytes: int
    breakdown: dict[str, int]
    peak_phase: str
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)
    phase_end_breakdown: dict[str, dict[str, int]] = field(default_factory=dict)
    method: str = METHOD
    seconds: float = 0.0


def step_input_shapes(workload, target: str, dtype: str, amp: bool) -> tuple:
    """``(param_dtype, x_shape, x_dtype, y_shape, y_dtype)`` of one traced step (inputs take the parameters'
    dtype unless autocast runs). Shared by the memory trace and the step-time prediction.

    Raises:
        BatchpilotError: a target other than ``cpu``/``cuda``.
    """
    if target not in ("cpu", "cuda"):
        raise BatchpilotError(f"trace target must be 'cpu' or 'cuda', got {target!r}")
    param_dtype = torch_dtype(dtype)
    x_shape, x_dtype, y_shape, y_dtype = sample_shapes(workload)
    if x_dtype.is_floating_point and not amp:
        x_dtype = param_dtype
    return param_dtype, x_shape, x_dtype, y_shape, y_dtype


def _global_peak_tracker() -> Any:
    """``MemTracker`` that keeps only the global peak.

    The stock ``_update_peak_stats`` also refreshes every module's local peak after every
    op (modules x ops work: most of a GPT-2 trace's time); we only need the global one.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    class GlobalPeakTracker(MemTracker):
        def _update_peak_stats(self, peak_state: Any) -> None:
            for dev, dev_snap in self._curr_mem_snap.items():
                total = dev_snap.get("Total", 0)
                if self._peak_mem.get(dev, 0) < total:
                    self._peak_mem[dev] = total
                    self._peak_mem_snap[dev] = dict(dev_snap)

    return GlobalPeakTracker()


def mem_tracker_available() -> bool:
    """Whether this torch has the ``MemTracker`` this module relies on (torch >= 2.5)."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return False
    needed = ("track_external", "get_tracker_snapshot", "reset_mod_stats", "_peak_mem", "_peak_mem_snap", "_curr_mem_snap",
              "_update_peak_stats")
    probe = MemTracker()
    return all(hasattr(probe, name) for name in needed)


@contextlib.contextmanager
def _cuda_block_rounding(enabled: bool) -> Iterator[None]:
    """Charge each storage as the CUDA caching allocator would: rounded up to 512 bytes."""
    if not enabled:
        yield
        return
    from torch.distributed._tools import mem_tracker as mt

    cls = getattr(mt, "_WeakRefInfo", None)
    if cls is None or not hasattr(cls, "_calculate_mem_consumed"):
        yield
        return
    orig = cls._calculate_mem_consumed

    def rounded(self: Any) -> int:
        nbytes = self.size * self.element_size
        return math.ceil(nbytes / CUDA_MIN_BLOCK_BYTES) * CUDA_MIN_BLOCK_BYTES

    cls._calculate_mem_consumed = rounded
    try:
        yield
    finally:
        cls._calculate_mem_consumed = orig


def sample_shapes(workload: Workload) -> tuple[torch.Size, torch.dtype, torch.Size, torch.dtype]:
    """Shape and dtype of one training input and one target (from the first training item)."""
    item = workload.train_data[0]
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, torch.Tensor) for t in item)):
        raise BatchpilotError(f"workload {workload.name!r}: training items must be (input, target) tensors")
    x0, y0 = item
    return x0.shape, x0.dtype, y0.shape, y0.dtype


def _snapshot_totals(snap: dict) -> tuple[int, dict[str, int]]:
    total = 0
    cats = dict.fromkeys(CATEGORIES, 0)
    for dev_snap in snap.values():
        for key, value in dev_snap.items():
            name = getattr(key, "value", key)
            if name == "Total":
                total += int(value)
            elif name in _CATEGORY_OF:
                cats[_CATEGORY_OF[name]] += int(value)
    return total, cats


def trace_step(workload: Workload, batch: int, *, dtype: str = "float32", amp: bool = False,
               checkpointing: bool = False, target: str = "cpu", optimizer_impl: str = "default") -> StepTrace:
    """Trace two training steps at micro-batch ``batch`` with fake tensors.

    Args:
        workload: the workload; its factories are called under fake mode (RNG states are restored).
        batch: micro-batch size.
        dtype: parameter dtype (``float32``/``bfloat16``/``float16``), or the autocast dtype with ``amp``.
        amp: autocast with fp32 weights.
        checkpointing: activation checkpointing per block (see :func:`apply_checkpointing`).
        target: ``"cpu"`` or ``"cuda"``. For CUDA, storages are rounded to 512 B, SDPA is charged
            as a flash-like kernel and optimizers default to ``foreach`` kernels.
        optimizer_impl: ``default``/``foreach``/``fused``/``for-loop``.

    Raises:
        RuntimeError and friends from tracing (e.g. data-dependent control flow): callers fall back.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    param_dtype, x_shape, x_dtype, y_shape, y_dtype = step_input_shapes(workload, target, dtype, amp)
    impl = optimizer_impl if optimizer_impl != "default" or target == "cpu" else "foreach"
    units = batch * max(1, math.prod(y_shape))
    start = time.perf_counter()
    phase_peaks: dict[str, int] = {}
    phase_end: dict[str, dict[str, int]] = {}
    best: tuple[int, dict[str, int], str] = (-1, {}, "")
    with torch.random.fork_rng(devices=[]), preserved_host_rng(), _cuda_block_rounding(target == "cuda"), \
            cuda_attention(target == "cuda"), FakeTensorMode():
        model, optimizer = build_step_objects(workload, param_dtype, amp=amp, checkpointing=checkpointing,
                                              optimizer_impl=impl)
        x = torch.empty((batch, *x_shape), dtype=x_dtype)
        y = torch.zeros((batch, *y_shape), dtype=y_dtype)
        tracker = _global_peak_tracker()
        tracker.track_external(model, optimizer, x, y)

        def mark(phase: str) -> None:
            nonlocal best
            peak, cats = _snapshot_totals(tracker.get_tracker_snapshot("peak"))
            phase_peaks[phase] = peak
            if peak > best[0]:
                best = (peak, cats, phase)
            current = tracker.get_tracker_snapshot("current")
            phase_end[phase] = _snapshot_totals(current)[1]
            # Reset the running peak to the current live bytes, so the next phase has its own peak.
            tracker._peak_mem_snap = current
            tracker._peak_mem = {dev: snap.get("Total", 0) for dev, snap in tracker._peak_mem_snap.items()}

        workspace = CpuKernelWorkspace() if target == "cpu" else contextlib.nullcontext()
        with tracker, workspace:
            for step in (1, 2):
                with autocast_context(amp, dtype):
                    loss = workload.loss_sum(model(x), y) / units
                mark(f"step{step}.forward")
                loss.backward()
                del loss
                mark(f"step{step}.backward")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                mark(f"step{step}.optimizer")
                tracker.reset_mod_stats()
    peak, cats, phase = best
    return StepTrace(batch=batch, peak_bytes=peak, breakdown=cats, peak_phase=phase, phase_peak_bytes=phase_peaks,
                     phase_end_breakdown=phase_end,
                     method=METHOD + (" (cuda target)" if target == "cuda" else ""),
                     seconds=time.perf_counter() - start)
