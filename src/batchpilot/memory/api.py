"""``memory_curve``: trace a workload at a few batches and fit M(B), with a fallback to real measurement."""

from __future__ import annotations

import time
import warnings
from typing import Sequence

from batchpilot.errors import BatchpilotError
from batchpilot.memory import measure, trace
from batchpilot.memory.curve import MemoryCurve, fit_curve
from batchpilot.memory.options import DTYPES
from batchpilot.workloads import Workload, get_workload

FALLBACK_BATCHES = (1, 2, 4)
"""Batches the fallback really runs (small: the real batch is allocated; the asymptote is less certain)."""


LADDER_RATIO = 4
SLOPE_TOLERANCE = 0.01
MAX_TRACES = 10


def default_batches(workload: Workload) -> tuple[int, ...]:
    """The first traced ladder: 1, 4, 16, ... up to the first rung >= 4b (b = base batch).

    Tracing costs the same at any batch, so the ladder is geometric. Batch 1 anchors the
    small-batch end, where fixed memory sets the peak; :func:`memory_curve` then extends
    the ladder until the per-sample slope stops changing (the activation-dominated regime).
    """
    top = 4 * max(1, workload.base_batch)
    out = [1]
    while out[-1] < top:
        out.append(out[-1] * LADDER_RATIO)
    return tuple(out)


def batches_to_trace(workload: Workload, batch_sizes: Sequence[int] | None) -> list[int]:
    """``batch_sizes`` sorted without repeats (default: :func:`default_batches`), each checked positive.

    Raises:
        BatchpilotError: a batch size that is not a positive integer.
    """
    batches = sorted(set(batch_sizes)) if batch_sizes is not None else list(default_batches(workload))
    for b in batches:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise BatchpilotError(f"batch sizes must be positive integers, got {b!r}")
    return batches


def slope_settled(points: Sequence[tuple[int, int]], tol: float = SLOPE_TOLERANCE) -> bool:
    """Whether the last two chords of the (batch, peak) points have the same slope within ``tol``."""
    if len(points) < 3:
        return False
    (b0, v0), (b1, v1), (b2, v2) = sorted(points)[-3:]
    s1, s2 = (v1 - v0) / (b1 - b0), (v2 - v1) / (b2 - b1)
    return abs(s2 - s1) <= tol * max(abs(s2), 1e-12)


def with_seq_len(workload: Workload, seq_len: int | None) -> Workload:
    """The same workload at another sequence length (rebuilt through its factory's ``seq_len`` option)."""
    if seq_len is None or seq_len == workload.seq_len:
        return workload
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise BatchpilotError(f"seq_len must be a positive integer, got {seq_len!r}")
    if workload.seq_len is None:
        raise BatchpilotError(f"workload {workload.name!r} is not a sequence model; --seq-len does not apply")
    try:
        if workload.rebuild is not None:  # keeps the workload's other options (hf: size, head, data)
            return workload.rebuild(seq_len=seq_len)
        return get_workload(workload.name, seq_len=seq_len)
    except BatchpilotError as exc:
        raise BatchpilotError(f"workload {workload.name!r} cannot be rebuilt at seq_len={seq_len}: {exc}") from exc


def _target_kind(device: str) -> str:
    if device in ("cpu", "cuda"):
        return device
    from batchpilot.memory.devices import resolve_device

    return resolve_device(device).kind


def _phase_split(phase_peaks: dict[str, int]) -> tuple[int, int]:
    fb = max((v for k, v in phase_peaks.items() if k.endswith(("forward", "backward"))), default=0)
    opt = max((v for k, v in phase_peaks.items() if k.endswith("optimizer")), default=0)
    return fb, opt


def memory_curve(workload: Workload, *, batch_sizes: Sequence[int] | None = None, dtype: str = "float32",
                 amp: bool = False, checkpointing: bool = False, device: str = "cpu", seq_len: int | None = None,
                 optimizer_impl: str = "default", allow_fallback: bool = True) -> MemoryCurve:
    """Trace a full training step at a few micro-batches and fit ``M(B)``.

    Args:
        workload: the workload (its factories build separate tracing objects; nothing of the user's is touched).
        batch_sizes: traced micro-batches (default: the ladder of :func:`default_batches`, extended
            by factors of 4 until the per-sample slope settles; at most ``MAX_TRACES`` traces).
        dtype: ``float32``/``bfloat16``/``float16`` parameters, or the autocast dtype with ``amp``.
        amp: autocast with fp32 weights.
        checkpointing: activation checkpointing per block.
        device: ``"cpu"``, ``"cuda"`` or a GPU name: selects the trace target (see :func:`trace.trace_step`).
        seq_len: sequence length for sequence models (rebuilds the workload at that length).
        optimizer_impl: ``default``/``foreach``/``fused``/``for-loop``.
        allow_fallback: when fake tensors cannot trace the model (or ``MemTracker`` is missing),
            measure real steps at batches 1, 2, 4 on CPU instead; ``method`` says so.

    Raises:
        BatchpilotError: bad options, or a model that neither method can run.
    """
    if dtype not in DTYPES:
        raise BatchpilotError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    workload = with_seq_len(workload, seq_len)
    target = _target_kind(device)
    batches = batches_to_trace(workload, batch_sizes)
    options = {"dtype": dtype, "amp": amp, "checkpointing": checkpointing, "target": target,
               "optimizer_impl": optimizer_impl}
    start = time.perf_counter()
    reason = ""
    if trace.mem_tracker_available():
        try:
            def one(b: int) -> trace.StepTrace:
                return trace.trace_step(workload, b, dtype=dtype, amp=amp, checkpointing=checkpointing,
                                        target=target, optimizer_impl=optimizer_impl)

            traces = [one(b) for b in batches]
            while (batch_sizes is None and len(traces) < MAX_TRACES
                   and not slope_settled([(t.batch, t.peak_bytes) for t in traces])):
                traces.append(one(traces[-1].batch * LADDER_RATIO))
            batches = [t.batch for t in traces]
        except BatchpilotError:
            raise
        except Exception as exc:  # noqa: BLE001 - untraceable model: fall back below
            reason = f"fake-tensor trace failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
        else:
            splits = [_phase_split(t.phase_peak_bytes) for t in traces]
            return fit_curve(batches, [s[0] for s in splits], [s[1] for s in splits], [t.peak_bytes for t in traces],
                             breakdown=dict(traces[-1].breakdown), method=traces[0].method,
                             peak_phase_at={t.batch: t.peak_phase for t in traces}, seq_len=workload.seq_len,
                             options=options, trace_seconds=time.perf_counter() - start)
    else:
        reason = "torch.distributed._tools.mem_tracker.MemTracker is not available in this torch"
    if not allow_fallback:
        raise BatchpilotError(f"workload {workload.name!r}: {reason}")
    warnings.warn(f"batchpilot memory: {reason}; measuring real steps at batches {FALLBACK_BATCHES} on CPU",
                  RuntimeWarning, stacklevel=2)
    try:
        runs = [measure.measure_step(workload, b, dtype=dtype, amp=amp, checkpointing=checkpointing,
                                     optimizer_impl=optimizer_impl) for b in FALLBACK_BATCHES]
    except BatchpilotError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise BatchpilotError(f"workload {workload.name!r}: {reason}, and a real CPU step failed too "
                              f"({type(exc).__name__}: {exc})") from exc
    splits = [_phase_split(r.phase_peak_bytes) for r in runs]
    return fit_curve(list(FALLBACK_BATCHES), [s[0] for s in splits], [s[1] for s in splits],
                     [r.peak_bytes for r in runs], breakdown={}, method=f"fallback: {measure.METHOD}; {reason}",
                     seq_len=workload.seq_len, options=options, trace_seconds=time.perf_counter() - start)
