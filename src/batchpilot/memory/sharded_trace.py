"""Trace one rank's memory of an FSDP2 training step with fake tensors and a fake process group.

The model is built under ``FakeTensorMode`` from the workload's factories, its units are
``fully_shard``-ed over a fake process group of ``N`` ranks (:mod:`batchpilot.memory.sharding`), and
two training steps run under PyTorch's ``FSDPMemTracker`` (``torch.distributed._tools.fsdp2_mem_tracker``,
private API, tested in PyTorch to within 10% of the CUDA allocator). It sees FSDP2's own buffers:
the all-gather output and the unsharded parameters copied out of it, the unsharded gradients and the
reduce-scatter input, besides the sharded states, activations and backward temporaries. Nothing is
allocated and no collective moves data, so it traces any world size on one CPU.

Categories (bytes at the peak), grouped as in ZeRO (Rajbhandari et al. 2020):

* sharded states, ``1/N`` of the model each: ``sharded_params``, ``sharded_grads``, ``optimizer_state``;
* in flight, one or two units at a time: ``unsharded_params`` (gathered parameters and all-gather
  buffers), ``unsharded_grads`` (gradients before their reduce-scatter, and its buffers);
* ``activations``, ``temporaries`` (backward), ``inputs`` and ``buffers`` (replicated module buffers).

With ``cpu_offload`` the sharded states live in host memory: the device peak leaves them out.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from batchpilot.errors import BatchpilotError
from batchpilot.memory.options import build_step_objects, cuda_attention, force_optimizer_impl, torch_dtype
from batchpilot.memory.sharding import ShardingConfig, apply_fully_shard, fake_process_group
from batchpilot.memory.trace import PHASES, _cuda_block_rounding, step_input_shapes
from batchpilot.memory.workspace import CpuKernelWorkspace
from batchpilot.workloads import Workload
from batchpilot.workloads.common import preserved_host_rng

SHARDED_STATES = ("sharded_params", "sharded_grads", "optimizer_state")
IN_FLIGHT = ("unsharded_params", "unsharded_grads")
CATEGORIES = SHARDED_STATES + IN_FLIGHT + ("activations", "temporaries", "inputs", "buffers")
_CATEGORY_OF = {"Sharded Param": "sharded_params", "Sharded Grad": "sharded_grads", "OptState": "optimizer_state",
                "Unsharded Param": "unsharded_params", "All Gather": "unsharded_params",
                "Unsharded Grad": "unsharded_grads", "Reduce Scatter": "unsharded_grads",
                "Activation": "activations", "Temp": "temporaries", "Inputs": "inputs", "Buffer": "buffers"}
METHOD = "fake-tensor FSDPMemTracker, fake process group"


@dataclass(frozen=True)
class ShardedStepTrace:
    """One rank's peak over two traced FSDP training steps at one micro-batch.

    Attributes:
        batch: micro-batch per rank.
        peak_bytes: device peak over all phases (host-offloaded states left out).
        breakdown: bytes by category (:data:`CATEGORIES`) at that peak.
        peak_phase: the phase of the peak (one of ``trace.PHASES``).
        phase_peak_bytes: each phase's own device peak.
        units: the FSDP units (``""`` is the root).
        host_bytes: the most bytes of offloaded sharded states at any moment (0 without ``cpu_offload``).
        method, seconds: how and how long.
    """

    batch: int
    peak_bytes: int
    breakdown: dict[str, int]
    peak_phase: str
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)
    units: tuple[str, ...] = ()
    host_bytes: int = 0
    method: str = METHOD
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.batch < 1 or self.peak_bytes < 0:
            raise BatchpilotError(f"bad sharded trace: batch {self.batch}, peak {self.peak_bytes}")
        if self.peak_phase not in PHASES:
            raise BatchpilotError(f"unknown phase {self.peak_phase!r}")


def _categories(dev_snap: dict) -> dict[str, int]:
    cats = dict.fromkeys(CATEGORIES, 0)
    for key, value in dev_snap.items():
        name = getattr(key, "value", key)
        if name in _CATEGORY_OF:
            cats[_CATEGORY_OF[name]] += int(value)
    return cats


def _device_bytes(cats: dict[str, int], offload: bool) -> int:
    return sum(v for k, v in cats.items() if not (offload and k in SHARDED_STATES))


def _tracker(model: Any, optimizer: Any, offload: bool) -> Any:
    """``FSDPMemTracker`` keeping only the global peak of device bytes (and its categories).

    The stock ``_update_peak_stats`` also refreshes every module's local peak after every op; only
    the global one is needed here, as in :func:`batchpilot.memory.trace._global_peak_tracker`.
    """
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    class DevicePeakTracker(FSDPMemTracker):
        peak: tuple[int, dict[str, int]] = (0, {})
        host_peak: int = 0

        def _update_peak_stats(self, peak_state: Any) -> None:
            cats: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
            for dev_snap in self._curr_mem_snap.values():
                for k, v in _categories(dev_snap).items():
                    cats[k] += v
            total = _device_bytes(cats, offload)
            if offload:
                self.host_peak = max(self.host_peak, sum(cats[k] for k in SHARDED_STATES))
            if total > self.peak[0]:
                self.peak = (total, cats)

    return DevicePeakTracker(model, optimizer)


@contextlib.contextmanager
def _separate_propagation_mode() -> Iterator[None]:
    """Let DTensor's sharding propagation run its shape inference in a fake mode of its own.

    ``ShardingPropagator`` infers an op's output metadata by running it on global-shape fake tensors
    in ``detect_fake_mode() or FakeTensorMode()``: under our fake mode it would reuse ours, and the tracker
    would charge those global-shape tensors to the rank (once per op signature: the first optimizer step
    showed 3x the unsharded model). ``FSDPMemTracker`` skips ops from any other fake mode; this gives
    propagation one.
    """
    try:
        from torch.distributed.tensor import _sharding_prop as sp
    except Exception:  # noqa: BLE001 - no DTensor propagation to separate
        yield
        return
    if not hasattr(sp, "detect_fake_mode"):
        yield
        return
    orig = sp.detect_fake_mode
    sp.detect_fake_mode = lambda *args, **kwargs: None
    try:
        yield
    finally:
        sp.detect_fake_mode = orig


def trace_sharded_step(workload: Workload, batch: int, config: ShardingConfig, *, dtype: str = "float32",
                       amp: bool = False, checkpointing: bool = False, target: str = "cpu",
                       optimizer_impl: str = "default") -> ShardedStepTrace:
    """Trace two FSDP training steps of one rank at micro-batch ``batch`` per rank.

    Args:
        workload: the workload (its factories run under fake mode; RNG states are restored).
        batch: micro-batch per rank.
        config: an ``fsdp`` :class:`~batchpilot.memory.sharding.ShardingConfig`.
        dtype: parameter dtype; with ``amp``, the compute dtype of FSDP's mixed precision
            (fp32 sharded master weights, all-gathers and compute in bf16/fp16 (bf16 for float32),
            gradients reduced in fp32), in place of autocast.
        checkpointing: activation checkpointing per block (inside the FSDP units).
        target: ``"cpu"`` or ``"cuda"`` (512-byte blocks, flash-like SDPA, foreach optimizers), as in
            :func:`batchpilot.memory.trace.trace_step`.
        optimizer_impl: ``default``/``foreach``/``fused``/``for-loop``.

    Raises:
        BatchpilotError: a ``ddp`` config or bad options; tracing errors (untraceable models) propagate.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not config.sharded:
        raise BatchpilotError("trace_sharded_step traces --strategy fsdp; ddp uses the plain trace")
    param_dtype, x_shape, x_dtype, y_shape, y_dtype = step_input_shapes(workload, target, dtype, amp)
    mp_dtype = (torch.bfloat16 if dtype == "float32" else torch_dtype(dtype)) if amp else None
    impl = optimizer_impl if optimizer_impl != "default" or target == "cpu" else "foreach"
    units_count = batch * max(1, math.prod(y_shape))
    start = time.perf_counter()
    phase_peaks: dict[str, int] = {}
    best: tuple[int, dict[str, int], str] = (-1, {}, "")
    with torch.random.fork_rng(devices=[]), preserved_host_rng(), _cuda_block_rounding(target == "cuda"), \
            cuda_attention(target == "cuda"), fake_process_group(config.world_size) as mesh, _separate_propagation_mode(), \
            FakeTensorMode():
        model, _ = build_step_objects(workload, param_dtype, amp=False, checkpointing=checkpointing,
                                      optimizer_impl="default")
        units = apply_fully_shard(model, config, mesh, mp_dtype=mp_dtype)
        optimizer = workload.make_optimizer(model.parameters(), workload.base_lr)
        force_optimizer_impl(optimizer, impl)
        x = torch.empty((batch, *x_shape), dtype=x_dtype)
        y = torch.zeros((batch, *y_shape), dtype=y_dtype)
        tracker = _tracker(model, optimizer, config.cpu_offload)
        tracker.track_inputs((x, y))

        def mark(phase: str) -> None:
            nonlocal best
            peak, cats = tracker.peak
            phase_peaks[phase] = peak
            if peak > best[0]:
                best = (peak, cats, phase)
            current: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
            for dev_snap in tracker.get_tracker_snapshot("current").values():
                for k, v in _categories(dev_snap).items():
                    current[k] += v
            tracker.peak = (_device_bytes(current, config.cpu_offload), current)  # the next phase's own peak

        workspace = CpuKernelWorkspace() if target == "cpu" else contextlib.nullcontext()
        with tracker, workspace:
            for step in (1, 2):
                loss = workload.loss_sum(model(x), y) / units_count
                mark(f"step{step}.forward")
                loss.backward()
                del loss
                mark(f"step{step}.backward")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                mark(f"step{step}.optimizer")
                tracker.reset_mod_stats()
    peak, cats, phase = best
    host = tracker.host_peak
    return ShardedStepTrace(batch=batch, peak_bytes=peak, breakdown=cats, peak_phase=phase,
                            phase_peak_bytes=phase_peaks, units=tuple(units), host_bytes=host,
                            method=METHOD + (" (cuda target)" if target == "cuda" else ""),
                            seconds=time.perf_counter() - start)
