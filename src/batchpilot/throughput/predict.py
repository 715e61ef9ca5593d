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
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from batchpilot.errors import BatchpilotError
from batchpilot.throughput.band import DOCUMENTED, UNCERTAINTY, Calibration, StepTimeBand
from batchpilot.throughput.device_model import (  # noqa: F401 - re-exported: predict.gpu_model etc. are public
    BANDWIDTH_EFFICIENCY, GPU_BANDWIDTH, LAUNCH_S, MATMUL_EFFICIENCY, SOURCE_BANDWIDTH, GpuModel, _table_key,
    cpu_model, gpu_model, predictable_gpus)
from batchpilot.throughput.measure import ThroughputCurve, ThroughputPoint, default_batches, fit_step_time
from batchpilot.throughput.peak_flops import GPU_PEAK_TFLOPS  # noqa: F401 - re-exported
from batchpilot.throughput.op_trace import OpTrace, trace_ops  # noqa: F401 - re-exported
from batchpilot.workloads import Workload

PREDICTED_SPREAD = DOCUMENTED.relative
"""``step_s_spread`` given to predicted points: the relative error between two batches of one model, which the
planner's ties read (:mod:`batchpilot.throughput.band`)."""




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
