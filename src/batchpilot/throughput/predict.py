"""Predicted step time on a device that is not here: an op-by-op roofline over one traced training step.

Nothing in this module runs on, or has been checked against, a GPU yet (see docs/gpu.md). Every figure
it returns is a **prediction** and is labelled so wherever it is shown.

**The trace.** One full training step (forward, backward, optimizer step, ``zero_grad``) runs on fake
tensors, as the memory trace does (:mod:`batchpilot.memory.trace`: same model build, the same
flash-like attention and ``foreach`` optimizer kernels for a CUDA target, the same autocast), under a
dispatch mode that records every aten op: its FLOPs (the formulas of ``torch.utils.flop_counter``;
matmuls, convolutions, attention), the bytes it reads and writes (its input and output tensors; views
and allocations move none), its dtype, and whether it is a causal attention kernel. The second of two
steps is kept (the first creates the optimizer state). Tracing at two micro-batches and taking each
op's FLOPs and bytes as linear in the batch gives every op at any batch.

**The cost model** (the constants are module attributes, documented below and in docs/gpu.md):

    op time    = max(FLOPs / (peak[dtype] * MATMUL_EFFICIENCY), bytes / (bandwidth * BANDWIDTH_EFFICIENCY))
    phase time = max(sum of op times, kernels * LAUNCH_S)        (the host launches while the device runs)
    step time  = forward+backward phase + optimizer phase

``peak[dtype]`` is the datasheet's dense peak (:mod:`batchpilot.throughput.peak_flops`): fp32 CUDA cores
for fp32 matmuls (PyTorch's default ``allow_tf32=False``), TF32 for fp32 convolutions (cuDNN's default
``allow_tf32=True``), the bf16/fp16 tensor-core peak for half-precision ops. Causal attention kernels do
half the work of the full score matrix that the FLOP formulas count. Ops with no FLOP formula
(elementwise, norms, reductions, the optimizer) are bound by memory bandwidth.

**Uncertainty.** The efficiencies are assumptions, not calibrations: what one GPU reaches depends on
shapes, kernels and the host. Until ``bench/gpu_check.py`` has measured them, treat a predicted step
time as good to a factor of :data:`UNCERTAINTY` either way (:mod:`batchpilot.throughput.band`, which also
calibrates the factor from measured steps). Between two batches of the same model most of that error is
shared (the same kernels at other sizes): the plan's ties use the smaller relative band, and the absolute
band goes into every candidate's goodput band.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from batchpilot.errors import BatchpilotError
from batchpilot.throughput.band import DOCUMENTED, UNCERTAINTY, Calibration, StepTimeBand
from batchpilot.throughput.measure import ThroughputCurve, ThroughputPoint, default_batches, fit_step_time
from batchpilot.throughput.peak_flops import GPU_PEAK_TFLOPS, gpu_peak_flops
from batchpilot.workloads import Workload

MATMUL_EFFICIENCY = 0.5
"""Share of the datasheet peak that matmul, convolution and attention kernels reach (an MFU-like assumption;
large-model training reports 40-60% on A100/H100, small shapes less)."""
BANDWIDTH_EFFICIENCY = 0.7
"""Share of the datasheet memory bandwidth that elementwise, normalisation and optimizer kernels reach."""
LAUNCH_S = 8e-6
"""Host time per kernel of an eager PyTorch step (dispatch plus CUDA launch): the floor of a small model's step."""
PREDICTED_SPREAD = DOCUMENTED.relative
"""``step_s_spread`` given to predicted points: the relative error between two batches of one model, which the
planner's ties read (:mod:`batchpilot.throughput.band`)."""
SOURCE_BANDWIDTH = "NVIDIA datasheets (H200, H100 SXM5/PCIe, A100 40/80GB SXM, V100 SXM2, T4, L4, RTX 4090/3090)"

# Peak memory bandwidth, bytes/s, by the device-table name (batchpilot.memory.devices).
GPU_BANDWIDTH: dict[str, float] = {
    "H200": 4.8e12,
    "H100": 3.35e12,
    "H100-PCIE": 2.0e12,
    "A100-80GB": 2.039e12,
    "A100-40GB": 1.555e12,
    "L4": 0.3e12,
    "V100-32GB": 0.9e12,
    "V100-16GB": 0.9e12,
    "T4": 0.32e12,
    "RTX 4090": 1.008e12,
    "RTX 3090": 0.936e12,
}

_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
              "_unsafe_view", "lift_fresh", "lift_fresh_copy", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
              "is_same_size", "_has_compatible_shallow_copy_type", "_local_scalar_dense", "set_", "resize_",
              "_reshape_alias", "view", "reshape", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
              "slice", "select", "as_strided", "split", "split_with_sizes", "chunk", "unbind", "_to_copy_noop",
              "prim::device", "record_stream", "copy_noop"}
_ATTENTION = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
              "_flash_attention_forward", "_efficient_attention_forward"}
_ATTENTION_BWD = {n + "_backward" for n in _ATTENTION} | {"_flash_attention_backward", "_efficient_attention_backward"}
_FOREACH_TENSORS_PER_LAUNCH = 24
"""A ``_foreach_*`` op launches about one kernel per this many tensors (multi_tensor_apply's chunking)."""


@dataclass(frozen=True)
class GpuModel:
    """What the prediction assumes about a device.

    Attributes:
        name: the device-table name (``H100``).
        peak_flops: dense peak FLOP/s by compute class: ``fp32``, ``tf32``, ``half`` (bf16/fp16 tensor cores).
        bandwidth: peak memory bandwidth, bytes/s.
        matmul_efficiency, bandwidth_efficiency, launch_s: the cost model's assumptions (module constants by default).
        asynchronous: the host launches kernels while the device runs (a GPU); a CPU runs each op in turn.
        source: where the figures come from.
    """

    name: str
    peak_flops: dict[str, float]
    bandwidth: float
    matmul_efficiency: float = MATMUL_EFFICIENCY
    bandwidth_efficiency: float = BANDWIDTH_EFFICIENCY
    launch_s: float = LAUNCH_S
    asynchronous: bool = True
    source: str = ""

    def describe(self) -> str:
        """One line: the assumptions."""
        return (f"{self.name}: peak {self.peak_flops['fp32'] / 1e12:.1f}/{self.peak_flops['tf32'] / 1e12:.1f}/"
                f"{self.peak_flops['half'] / 1e12:.1f} TFLOP/s fp32/tf32/bf16 x {self.matmul_efficiency:.0%}, "
                f"{self.bandwidth / 1e12:.2f} TB/s x {self.bandwidth_efficiency:.0%}, "
                f"{self.launch_s * 1e6:.0f} us per kernel")


def _table_key(name: str) -> str | None:
    """The device-table name for ``name`` (``H100``, ``"a100-80gb"``, ``"NVIDIA H100 80GB HBM3"`` ...)."""
    from batchpilot.memory.devices import GPU_TABLE_MIB, _ALIASES

    upper = name.strip().upper().replace("NVIDIA ", "").replace("GEFORCE ", "")
    for table in (GPU_BANDWIDTH, _ALIASES, GPU_TABLE_MIB):
        for key in table:
            if upper == key.upper():
                key = _ALIASES.get(key, key)
                return key if key in GPU_BANDWIDTH else None
    variants = {"H100": "H100-PCIE" if "PCIE" in upper else "H100",  # a CUDA device name: "H100 80GB HBM3"
                "A100": "A100-40GB" if "40GB" in upper else "A100-80GB",
                "V100": "V100-32GB" if "32GB" in upper else "V100-16GB"}
    for base in sorted({k.split("-")[0] for k in GPU_BANDWIDTH}, key=len, reverse=True):
        if re.search(rf"(?<![A-Z0-9]){re.escape(base)}(?![A-Z0-9])", upper):
            return variants.get(base, base)
    return None


def gpu_model(name: str, **overrides: Any) -> GpuModel | None:
    """The cost model's view of a GPU by name, or ``None`` when its peak or bandwidth is not tabled."""
    key = _table_key(name)
    if key is None:
        return None
    lookup = key.replace("-", " ")
    fp32 = gpu_peak_flops(lookup, "float32", tf32=False)
    tf32 = gpu_peak_flops(lookup, "float32", tf32=True)
    half = gpu_peak_flops(lookup, "bfloat16")
    if fp32 is None or tf32 is None or half is None:
        return None
    return GpuModel(name=key, peak_flops={"fp32": fp32.flops_per_s, "tf32": tf32.flops_per_s, "half": half.flops_per_s},
                    bandwidth=GPU_BANDWIDTH[key], source=f"{half.source.split(',')[0]} (peak), {SOURCE_BANDWIDTH} "
                                                          "(bandwidth)", **overrides)


def predictable_gpus() -> list[str]:
    """Device-table names the cost model covers."""
    return [k for k in GPU_BANDWIDTH if gpu_model(k) is not None]


_CPU_BW_CACHE: dict[int, float] = {}


def cpu_model(*, launch_s: float = 10e-6) -> GpuModel:
    """This CPU through the same cost model (measured peak matmul FLOP/s and copy bandwidth, synchronous ops):
    for checking the model's structure against CPU measurements, not for planning."""
    from batchpilot.throughput.peak_flops import cpu_peak_flops

    threads = torch.get_num_threads()
    if threads not in _CPU_BW_CACHE:
        a = torch.ones(16 * 2**20 // 4)  # 16 MiB, beyond most caches
        b = torch.empty_like(a)
        b.copy_(a)
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            b.copy_(a)
            best = min(best, time.perf_counter() - t0)
        _CPU_BW_CACHE[threads] = 2 * a.numel() * 4 / best
    fp32 = cpu_peak_flops("float32").flops_per_s
    return GpuModel(name="cpu", peak_flops={"fp32": fp32, "tf32": fp32, "half": fp32}, bandwidth=_CPU_BW_CACHE[threads],
                    matmul_efficiency=1.0, bandwidth_efficiency=1.0, launch_s=launch_s, asynchronous=False,
                    source="measured here: matmul FLOP/s and a 16 MiB copy")


# ---------------------------------------------------------------- the op trace


@dataclass
class OpTrace:
    """Every kernel-launching op of one traced training step (the second of two), in order.

    Arrays are per op: ``flops``, ``bytes``, ``launches``, ``compute`` (``fp32``/``tf32``/``half``/``none``),
    ``causal`` (attention kernels with a causal mask), ``phase`` (``micro`` = forward + backward, ``optimizer``).
    """

    batch: int
    names: list[str] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    bytes: list[float] = field(default_factory=list)
    launches: list[int] = field(default_factory=list)
    compute: list[str] = field(default_factory=list)
    causal: list[bool] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def total_flops(self, phase: str = "micro") -> float:
        return float(sum(f for f, p in zip(self.flops, self.phase) if p == phase))


def _flop_functions() -> dict[str, Any]:
    from torch.utils.flop_counter import flop_registry

    by_name = {getattr(k, "__name__", str(k)): v for k, v in flop_registry.items()}
    aten = torch.ops.aten
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        # the CPU flash kernel a CUDA-target trace runs (memory/options.py): the flash kernel's formulas
        by_name["_scaled_dot_product_flash_attention_for_cpu"] = flop_registry[aten._scaled_dot_product_flash_attention]
        by_name["_scaled_dot_product_flash_attention_for_cpu_backward"] = \
            flop_registry[aten._scaled_dot_product_flash_attention_backward]
    return by_name


def _tensors(obj: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _is_causal(name: str, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("is_causal"):
        return True
    if name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        return len(args) > 4 and bool(args[4])
    if name == "_scaled_dot_product_flash_attention_for_cpu_backward" or name == "_scaled_dot_product_flash_attention_backward":
        return any(isinstance(a, bool) and a for a in args[6:9])
    return False


def _compute_class(name: str, tensors: list[torch.Tensor]) -> str:
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    if dtype in (torch.bfloat16, torch.float16):
        return "half"
    return "tf32" if "convolution" in name else "fp32"


def trace_ops(workload: Workload, batch: int, *, target: str = "cuda", dtype: str = "float32", amp: bool = False,
              checkpointing: bool = False) -> OpTrace:
    """Run two training steps at ``batch`` on fake tensors and record the second one's ops (see the module doc)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from batchpilot.memory.options import autocast_context, build_step_objects, cuda_attention
    from batchpilot.memory.trace import step_input_shapes
    from batchpilot.workloads.common import preserved_host_rng

    flop_fns = _flop_functions()
    trace = OpTrace(batch=batch)
    state = {"record": False, "phase": "micro"}

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if not state["record"]:
                return out
            name = func.overloadpacket.__name__
            if name in _NO_KERNEL or getattr(func, "is_view", False):
                return out
            ins = _tensors((args, kwargs))
            outs = _tensors(out)
            seen: set[int] = set()
            nbytes = 0
            for t in ins + outs:
                if id(t) not in seen:
                    seen.add(id(t))
                    nbytes += t.numel() * t.element_size()
            fn = flop_fns.get(name)
            flops = 0.0
            if fn is not None:
                try:
                    flops = float(fn(*args, **kwargs, out_val=out))
                except Exception:  # noqa: BLE001 - an unusual signature counts as memory-bound
                    flops = 0.0
            launches = 1
            if name.startswith("_foreach_"):
                launches = max(1, math.ceil(len(ins) / _FOREACH_TENSORS_PER_LAUNCH))
            trace.names.append(name)
            trace.flops.append(flops)
            trace.bytes.append(float(nbytes))
            trace.launches.append(launches)
            trace.compute.append(_compute_class(name, ins) if flops else "none")
            trace.causal.append((name in _ATTENTION or name in _ATTENTION_BWD) and _is_causal(name, args, kwargs))
            trace.phase.append(state["phase"])
            return out

    param_dtype, x_shape, x_dtype, y_shape, y_dtype = step_input_shapes(workload, target, dtype, amp)
    impl = "foreach" if target == "cuda" else "default"
    units = batch * max(1, math.prod(y_shape))
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), preserved_host_rng(), cuda_attention(target == "cuda"), FakeTensorMode():
        model, optimizer = build_step_objects(workload, param_dtype, amp=amp, checkpointing=checkpointing,
                                              optimizer_impl=impl)
        x = torch.zeros((batch, *x_shape), dtype=x_dtype)
        y = torch.zeros((batch, *y_shape), dtype=y_dtype)
        with Recorder():
            for step in (1, 2):
                state["record"] = step == 2
                state["phase"] = "micro"
                with autocast_context(amp, dtype):
                    loss = workload.loss_sum(model(x), y) / units
                loss.backward()
                del loss
                state["phase"] = "optimizer"
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    trace.seconds = time.perf_counter() - start
    return trace


# ---------------------------------------------------------------- the prediction


@dataclass(frozen=True)
class StepPrediction:
    """Predicted step time at one micro-batch, with the parts that bound it."""

    batch: int
    step_s: float
    micro_s: float
    optimizer_s: float
    flops: float
    compute_s: float
    memory_s: float
    launch_s: float
    bound: str

    @property
    def low_s(self) -> float:
        return self.step_s / UNCERTAINTY

    @property
    def high_s(self) -> float:
        return self.step_s * UNCERTAINTY


class StepTimeModel:
    """Per-op FLOPs and bytes as linear functions of the micro-batch, from traces at two batches."""

    def __init__(self, a: OpTrace, b: OpTrace, device: GpuModel) -> None:
        if a.names != b.names or a.phase != b.phase:
            raise BatchpilotError(f"the traced step runs different ops at batch {a.batch} and {b.batch}; "
                                  "the step time cannot be predicted from two traces")
        self.device = device
        self.b0, self.b1 = a.batch, b.batch
        self.flops0, self.flops1 = np.asarray(a.flops), np.asarray(b.flops)
        self.bytes0, self.bytes1 = np.asarray(a.bytes), np.asarray(b.bytes)
        self.launches = np.asarray(a.launches)
        self.phase = np.asarray(a.phase)
        peak = {"fp32": device.peak_flops["fp32"], "tf32": device.peak_flops["tf32"], "half": device.peak_flops["half"],
                "none": math.inf}
        self.peak = np.asarray([peak[c] for c in a.compute])
        self.work = np.where(np.asarray(a.causal), 0.5, 1.0)  # causal kernels skip the masked half
        self.trace_seconds = a.seconds + b.seconds
        self.num_ops = len(a.names)

    def _at(self, lo: np.ndarray, hi: np.ndarray, batch: float) -> np.ndarray:
        return np.maximum(lo + (hi - lo) * (batch - self.b0) / (self.b1 - self.b0), 0.0)

    def predict(self, batch: int) -> StepPrediction:
        """The predicted step at micro-batch ``batch``."""
        d = self.device
        flops = self._at(self.flops0, self.flops1, batch)
        nbytes = self._at(self.bytes0, self.bytes1, batch)
        compute = flops * self.work / (self.peak * d.matmul_efficiency)
        memory = nbytes / (d.bandwidth * d.bandwidth_efficiency)
        op_s = np.maximum(compute, memory)
        parts = {}
        for phase in ("micro", "optimizer"):
            mask = self.phase == phase
            device_s = float(op_s[mask].sum())
            host_s = float(self.launches[mask].sum()) * d.launch_s
            parts[phase] = max(device_s, host_s) if d.asynchronous else device_s + host_s
        compute_s = float(np.where(compute >= memory, compute, 0).sum())
        memory_s = float(np.where(memory > compute, memory, 0).sum())
        launch_s = float(self.launches.sum()) * d.launch_s
        bound = max((("compute", compute_s), ("memory", memory_s), ("launch", launch_s)), key=lambda kv: kv[1])[0]
        return StepPrediction(batch=batch, step_s=parts["micro"] + parts["optimizer"], micro_s=parts["micro"],
                              optimizer_s=parts["optimizer"], flops=float(flops[self.phase == "micro"].sum()),
                              compute_s=compute_s, memory_s=memory_s, launch_s=launch_s, bound=bound)


def step_time_model(workload: Workload, device: str | GpuModel, *, dtype: str = "float32", amp: bool = False,
                    checkpointing: bool = False, batches: tuple[int, int] = (2, 4)) -> StepTimeModel:
    """Trace ``workload`` at two micro-batches for ``device`` (a GPU name, or a :class:`GpuModel`).

    Raises:
        BatchpilotError: the GPU's peak or bandwidth is not tabled; the trace fails.
    """
    model = device if isinstance(device, GpuModel) else gpu_model(device)
    if model is None:
        raise BatchpilotError(f"no step-time model for GPU {device!r}: its peak FLOP/s or memory bandwidth is not in "
                              f"the tables; known: {', '.join(predictable_gpus())}")
    target = "cpu" if model.name == "cpu" else "cuda"
    a = trace_ops(workload, batches[0], target=target, dtype=dtype, amp=amp, checkpointing=checkpointing)
    b = trace_ops(workload, batches[1], target=target, dtype=dtype, amp=amp, checkpointing=checkpointing)
    return StepTimeModel(a, b, model)


def predicted_curve(workload: Workload, device: str | GpuModel, batches: Sequence[int], *, dtype: str = "float32",
                    amp: bool = False, checkpointing: bool = False, model: StepTimeModel | None = None,
                    band: StepTimeBand = DOCUMENTED, calibration: Calibration | None = None) -> ThroughputCurve:
    """A :class:`ThroughputCurve` of predicted (not measured) points for an absent GPU.

    ``device`` says ``"<name> (predicted, not measured)"`` and ``peak_source`` starts with ``predicted``, so a
    plan, its table and its report show which numbers are predictions. Each point's ``step_s_spread`` is the
    band's relative uncertainty (what the planner's ties read); MFU is against the peak of the precision the
    matmuls run in (the bf16/fp16 tensor-core peak with ``amp``, else fp32; Chowdhery et al. 2022, App. B).
    A ``calibration`` (:func:`batchpilot.throughput.band.calibrate`) multiplies every step by its efficiency factor
    and replaces ``band`` with its own.
    """
    factor = calibration.factor if calibration is not None else 1.0
    band = calibration.band if calibration is not None else band
    start = time.perf_counter()
    stm = model or step_time_model(workload, device, dtype=dtype, amp=amp, checkpointing=checkpointing)
    bs = sorted({int(b) for b in batches})
    if not bs or any(b < 1 for b in bs):
        raise BatchpilotError(f"batch sizes must be positive integers, got {list(batches)}")
    peak = stm.device.peak_flops["half" if amp or dtype in ("bfloat16", "float16") else "fp32"]
    points = []
    for b in bs:
        p = stm.predict(b)
        step = p.step_s * factor
        points.append(ThroughputPoint(batch=b, step_s=step, micro_s=p.micro_s * factor,
                                      optimizer_s=p.optimizer_s * factor, step_s_spread=band.relative, flops=p.flops,
                                      samples_per_s=b / step, mfu=p.flops / step / peak))
    overhead, per_sample = fit_step_time([p.batch for p in points], [p.step_s for p in points])
    residual = math.sqrt(float(np.mean([((overhead + per_sample * p.batch) / p.step_s - 1) ** 2 for p in points])))
    d = stm.device
    return ThroughputCurve(
        points=tuple(points), overhead_s=overhead, per_sample_s=per_sample, saturation_batch=9 * overhead / per_sample,
        peak_flops=peak, peak_source=f"predicted, not measured: {d.describe()}"
                                     + (f", x{factor:.3g} as calibrated on {calibration.device}" if calibration else "")
                                     + f"; {band.describe()}",
        device=f"{d.name} (predicted, not measured)", threads=torch.get_num_threads(), truncated_at=None,
        wall_s=time.perf_counter() - start, step_model="fit" if len(points) >= 3 and residual <= 0.15 else "points",
        fit_residual=residual)


def is_predicted(curve: ThroughputCurve | dict) -> bool:
    """Whether a throughput curve (or its plain data) is a prediction of this module."""
    source = curve["peak_source"] if isinstance(curve, dict) else curve.peak_source
    return str(source).startswith("predicted")


# ---------------------------------------------------------------- the plan's hook


def for_plan(workload: Workload, spec: Any, throughput: ThroughputCurve | None, measured_on: str, *, max_batch: int,
             amp: str | None = None, batches: Sequence[int] = (), calibration: Calibration | None = None,
             ) -> tuple[ThroughputCurve, str]:
    """The throughput a plan should use: for a named GPU target that is not here, its predicted curve.

    Called by :func:`batchpilot.plan.build.make_plan` after this machine's curve is measured (the LR check and
    the noise probe still need this machine's step time), or with ``throughput=None`` for a memory-only
    workload, which is never timed here. Returns ``(curve, measured_on)``: the predicted curve and
    ``"predicted"`` when ``spec`` names a GPU of the cost model's tables and no CUDA device is measuring;
    otherwise the inputs unchanged (a CUDA device here is measured; an unnamed or untabled GPU keeps this
    CPU's curve and the plan's caveat says so). ``amp`` (``bfloat16``/``float16``) predicts autocast steps;
    ``batches`` are added to the predicted points; a ``calibration`` scales the prediction and sets its band.

    Raises:
        BatchpilotError: ``throughput`` is ``None`` and there is nothing to predict for (no tabled GPU).
    """
    if getattr(spec, "kind", None) != "cuda" or measured_on != "cpu" or gpu_model(spec.name) is None:
        if throughput is None:
            raise BatchpilotError(f"no step-time prediction for device {getattr(spec, 'name', spec)!r}: name a GPU of "
                                  f"the tables ({', '.join(predictable_gpus())})")
        return throughput, measured_on
    known = throughput.batches if throughput is not None else []
    pts = set(default_batches(workload.base_batch, max_batch)) | {b for b in (*known, *batches) if b <= max_batch}
    pts |= {b for b in (workload.base_batch,) if b <= max_batch}
    try:
        curve = predicted_curve(workload, spec.name, sorted(pts), amp=amp is not None, dtype=amp or "float32",
                                calibration=calibration)
    except BatchpilotError:
        raise
    except Exception:  # noqa: BLE001 - a model the trace cannot run: keep this CPU's curve (the caveat says so)
        if throughput is None:
            raise
        return throughput, measured_on
    return curve, "predicted"


def band_of(curve: ThroughputCurve | dict, calibration: Calibration | None = None) -> StepTimeBand | None:
    """The step-time band of a predicted curve (the calibration's, else the documented one), ``None`` for a
    measured one."""
    if not is_predicted(curve):
        return None
    return calibration.band if calibration is not None else DOCUMENTED


def plan_caveats(throughput: ThroughputCurve, calibration: Calibration | None = None) -> list[str]:
    """The caveat a plan carries when its throughput is predicted."""
    band = band_of(throughput, calibration)
    if band is None:
        return []
    if calibration is not None:
        name = throughput.device.split(" (")[0]
        return [f"Throughput is PREDICTED for {name}, which is not here: step times come from the traced FLOPs and "
                f"bytes of one step against its datasheet peak and bandwidth, times the efficiency factor "
                f"x{calibration.factor:.3g} measured on {calibration.device} (--calibration). Samples/s, goodput and "
                f"wall times carry that calibration's band ({band.describe()})."]
    name = throughput.device.split(" (")[0]
    return [f"Throughput is PREDICTED for {name}, which is not here: step times come from the traced FLOPs and bytes "
            f"of one step against its datasheet peak and bandwidth ({MATMUL_EFFICIENCY:.0%} of peak for matmuls, "
            f"{BANDWIDTH_EFFICIENCY:.0%} of bandwidth, {LAUNCH_S * 1e6:.0f} us per kernel; never yet checked on a GPU). "
            f"Samples/s, goodput and wall times are good to x{band.high_factor:g} either way (each candidate's "
            f"goodput_band), and batches whose predicted goodput is within {band.relative:.0%} of the best tie; "
            "memory is traced as usual."]


def curve_dict(stm: StepTimeModel, batches: Sequence[int]) -> list[dict]:
    """Plain data of the predictions at ``batches`` (for benches and JSON)."""
    return [asdict(stm.predict(b)) for b in batches]


__all__ = ["BANDWIDTH_EFFICIENCY", "GPU_BANDWIDTH", "GPU_PEAK_TFLOPS", "GpuModel", "LAUNCH_S", "MATMUL_EFFICIENCY",
           "OpTrace", "StepPrediction", "StepTimeModel", "UNCERTAINTY", "band_of", "cpu_model", "for_plan", "gpu_model",
           "is_predicted", "plan_caveats", "predictable_gpus", "predicted_curve", "step_time_model", "trace_ops"]
