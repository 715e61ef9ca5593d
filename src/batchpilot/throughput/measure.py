"""Throughput: measured step time T(B), a fitted ``step_s(B) = overhead + per_sample·B``, and MFU.

A full training step (fetching the batch, forward, backward, optimizer step, zeroing the
gradients) is timed at geometric batch sizes on a *fresh* model after a warm-up, and the
median of several steps is kept. Everything runs under a forked RNG on objects built here,
so the caller's model, optimizer and random state are untouched.

MFU (model FLOP utilisation, Chowdhery et al. 2022, "PaLM", Appendix B) is the achieved
FLOP/s over the device's peak. The FLOPs of forward + backward are counted by
:class:`torch.utils.flop_counter.FlopCounterMode`. The peak comes from a float32 matmul
microbenchmark on CPU, and from the vendors' datasheets for GPUs (:mod:`batchpilot.throughput.peak_flops`).
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from batchpilot.workloads.data import fetch
from batchpilot.errors import BatchpilotError
from batchpilot.throughput.amp import amp_policy, autocast_or_null, peak_dtype
from batchpilot.throughput.peak_flops import GPU_PEAK_TFLOPS, PeakFlops, cpu_peak_flops, gpu_peak_flops
from batchpilot.workloads import Workload

__all__ = ["GPU_PEAK_TFLOPS", "PeakFlops", "ThroughputCurve", "ThroughputPoint", "choose_cpu_threads", "cpu_peak_flops",
           "default_batches", "fit_step_time", "gpu_peak_flops", "measure_throughput"]

Progress = Callable[[str, float], None]
"""``progress(description, fraction_done)``."""
FIT_MAX_RESIDUAL = 0.15
"""The fitted line predicts steps when its RMS relative residual over the points is at most 15%."""


@dataclass(frozen=True)
class ThroughputPoint:
    """Medians of the timed steps at one batch size.

    Attributes:
        batch: samples per forward/backward (no accumulation).
        step_s: full step: batch fetch, forward, backward, optimizer step, zero_grad.
        micro_s: the batch fetch, forward and backward alone (one micro-batch of an accumulated step).
        optimizer_s: optimizer step and zero_grad.
        step_s_spread: (max - min) / median of the timed full steps.
        flops: forward + backward FLOPs of one step (FlopCounterMode).
        samples_per_s: ``batch / step_s``.
        mfu: ``flops / step_s / peak``.
        round_step_s: the median full step of each interleaved timing round (see
            :func:`measure_throughput`); paired across batches, they give the uncertainty of step-time ratios.
    """

    batch: int
    step_s: float
    micro_s: float
    optimizer_s: float
    step_s_spread: float
    flops: float
    samples_per_s: float
    mfu: float
    round_step_s: tuple[float, ...] = ()


@dataclass(frozen=True)
class ThroughputCurve:
    """Measured points, the fitted line and MFU.

    Attributes:
        points: measurements, by increasing batch.
        overhead_s: fitted fixed cost per step.
        per_sample_s: fitted cost per sample.
        saturation_batch: ``9·overhead/per_sample``, where the fixed cost is 10% of the step: beyond
            it samples/s grows by less than 10% however large the batch (the hardware is full).
        peak_flops: the device peak used for MFU.
        peak_source: where ``peak_flops`` comes from.
        device: measured device.
        threads: torch intra-op threads during the measurement.
        truncated_at: the first batch not measured because of the time budget, else ``None``.
        step_model: ``fit`` predicts a step from the fitted line (smooth and monotone: noise in one
            point cannot flip a choice between neighbouring batches), ``points`` interpolates the
            measured points (when the line does not describe them: relative residual above
            :data:`FIT_MAX_RESIDUAL`).
        fit_residual: root-mean-square relative residual of the fitted line over the points.
    """

    points: tuple[ThroughputPoint, ...]
    overhead_s: float
    per_sample_s: float
    saturation_batch: float
    peak_flops: float
    peak_source: str
    device: str
    threads: int
    truncated_at: int | None = None
    wall_s: float = field(default=0.0, compare=False)
    step_model: str = "points"
    fit_residual: float = 0.0

    def __post_init__(self) -> None:
        if not self.points:
            raise BatchpilotError("a throughput curve needs at least one measured point")

    @property
    def batches(self) -> list[int]:
        """Measured batch sizes."""
        return [p.batch for p in self.points]

    @property
    def optimizer_s(self) -> float:
        """Median optimizer-step time over the points (it does not depend on the batch)."""
        return statistics.median(p.optimizer_s for p in self.points)

    def micro_s(self, batch: int) -> float:
        """Forward + backward time at ``batch``. With ``step_model == "fit"``: the fitted line less the
        optimizer step. Else log-log interpolation inside the measured range, the fitted per-sample
        cost beyond it."""
        if self.step_model == "fit":
            return max(self.overhead_s + self.per_sample_s * batch - self.optimizer_s, self.per_sample_s * batch)
        xs = [p.batch for p in self.points]
        ys = monotone([p.micro_s for p in self.points])  # a larger batch never takes less time
        if batch in xs:
            return ys[xs.index(batch)]
        if batch < xs[0]:  # the fitted slope below the range, never below proportional scaling
            return max(ys[0] - self.per_sample_s * (xs[0] - batch), ys[0] * batch / xs[0])
        if batch > xs[-1]:
            return ys[-1] + self.per_sample_s * (batch - xs[-1])
        return float(np.exp(np.interp(math.log(batch), np.log(xs), np.log(ys))))

    def step_s(self, micro_batch: int, accumulation_steps: int = 1) -> float:
        """Predicted time of one optimizer step of ``accumulation_steps`` micro-batches."""
        return accumulation_steps * self.micro_s(micro_batch) + self.optimizer_s

    def samples_per_s(self, micro_batch: int, accumulation_steps: int = 1) -> float:
        """Predicted samples/s of that step (one rank)."""
        return micro_batch * accumulation_steps / self.step_s(micro_batch, accumulation_steps)

    def _nearest(self, batch: int) -> ThroughputPoint:
        return min(self.points, key=lambda p: abs(math.log(p.batch) - math.log(batch)))

    def log_ratio_uncertainty(self, batch_a: int, batch_b: int) -> float:
        """How far ``log(step_s(a) / step_s(b))`` moves between measurements: two standard deviations
        of the per-round log ratio.

        The rounds were timed interleaved, so round ``r`` of both batches saw the same machine load:
        a load change that slows every batch alike cancels, and what remains is how much the ratio
        itself moves with the load. That is the spread of a single round, not the standard error of
        the mean over rounds: the question is whether another run of the plan, under another load,
        would rank the batches the same way. Batches between measured points take the nearest point's
        rounds. With fewer than two paired rounds the spread of the steps within the points stands in.
        """
        pa, pb = self._nearest(batch_a), self._nearest(batch_b)
        if pa is pb:
            return 0.0
        n = min(len(pa.round_step_s), len(pb.round_step_s))
        if n >= 2:
            logs = [math.log(a / b) for a, b in zip(pa.round_step_s[:n], pb.round_step_s[:n])]
            return 2.0 * statistics.stdev(logs)
        return 0.5 * (pa.step_s_spread + pb.step_s_spread)

    def to_dict(self) -> dict:
        """Plain data."""
        return asdict(self)


def monotone(values: Sequence[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators; Barlow et al. 1972).

    Step times measured on a busy machine can dip at a larger batch (a quiet moment); interpolating the raw
    points would then make that batch look several times faster than its neighbours and win the plan.
    """
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    out: list[float] = []
    for s, n in blocks:
        out += [s / n] * int(n)
    return out


def fit_step_time(batches: Sequence[int], step_s: Sequence[float]) -> tuple[float, float]:
    """Least squares ``step_s = overhead + per_sample·B`` on relative errors, both terms >= 0."""
    b = np.asarray(batches, dtype=float)
    t = np.asarray(step_s, dtype=float)
    if len(b) == 1:
        return 0.0, float(t[0] / b[0])
    w = 1.0 / t
    (overhead, per_sample), *_ = np.linalg.lstsq(np.stack([w, b * w], 1), t * w, rcond=None)
    if overhead < 0 or per_sample <= 0:
        if per_sample <= 0:  # time does not grow with the batch: all overhead
            return float(np.median(t)), 1e-12
        per_sample = float(np.sum(t * b * w * w) / np.sum(b * b * w * w))
        overhead = 0.0
    return float(overhead), float(per_sample)


def default_batches(base_batch: int, max_batch: int) -> list[int]:
    """Powers of two from ``base_batch/4`` (at least 1) up to ``max_batch``, plus ``max_batch`` itself."""
    if max_batch < 1:
        raise BatchpilotError(f"max batch must be >= 1, got {max_batch}")
    start = 1 << max(0, (max(1, base_batch // 4)).bit_length() - 1)
    out = []
    b = min(start, 1 << (max_batch.bit_length() - 1))
    while b <= max_batch:
        out.append(b)
        b *= 2
    if out[-1] != max_batch:
        out.append(max_batch)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(workload: Workload, batch: int, device: torch.device, dtype: torch.dtype):
    idx = torch.arange(batch) % workload.num_train
    x, y = fetch(workload.train_data, idx)
    x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    return x, y.to(device)


def _count_flops(model, loss_fn, x, y, units: int, policy=None) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with autocast_or_null(policy):
            loss = loss_fn(model(x), y) / units
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure_throughput(
    workload: Workload,
    *,
    batch_sizes: Sequence[int] | None = None,
    max_batch: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    warmup_steps: int = 2,
    timed_steps: int = 5,
    seed: int = 0,
    time_budget_s: float | None = None,
    peak: PeakFlops | None = None,
    progress: Progress | None = None,
    rounds: int = 4,
    amp: str | None = None,
) -> ThroughputCurve:
    """Time full training steps of a fresh copy of the workload's model at several batch sizes.

    Args:
        workload: what to time (its factories build the model and optimizer used here).
        batch_sizes: batches to time (default :func:`default_batches` up to ``max_batch``).
        max_batch: largest batch (default: the training-set size); e.g. the memory model's limit.
        device: ``cpu`` or ``cuda[:i]``.
        dtype: parameter and input dtype.
        warmup_steps: untimed steps per batch first.
        timed_steps: timed steps per batch; the median is kept.
        seed: seeds the fresh model (under a forked RNG).
        time_budget_s: stop before a batch once this much time has gone (the curve says where).
        peak: device peak FLOP/s (default: measured on CPU, datasheet for GPUs).
        progress: optional ``progress(description, fraction)`` callback.
        rounds: timing rounds. Round 1 warms up and times each batch in turn; the later rounds time
            ``timed_steps`` more steps of every batch, round robin, while the budget lasts. A load
            change on a shared machine then hits all batches alike instead of the ones timed last,
            and the per-round medians give the uncertainty of each step-time ratio.
        amp: ``bf16``/``fp16`` autocast around the forward and the loss (:mod:`batchpilot.throughput.amp`;
            fp16 only on CUDA); MFU is then against the half-precision peak.

    Raises:
        BatchpilotError: bad arguments (fp16 AMP on a CPU), or an unknown GPU without ``peak``.
    """
    if warmup_steps < 0 or timed_steps < 1:
        raise BatchpilotError(f"need warmup_steps >= 0 and timed_steps >= 1, got {warmup_steps}, {timed_steps}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BatchpilotError(f"device {device!r} asked for, but no CUDA device is visible")
    tdtype = getattr(torch, dtype, None)
    if not isinstance(tdtype, torch.dtype):
        raise BatchpilotError(f"dtype must be a torch dtype name such as float32, got {dtype!r}")
    cap = max_batch if max_batch is not None else workload.num_train
    batches = sorted(set(batch_sizes)) if batch_sizes is not None else default_batches(workload.base_batch, cap)
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise BatchpilotError(f"batch sizes must be positive integers, got {batches}")
    policy = amp_policy(amp, dev)
    if policy is not None and tdtype != torch.float32:
        raise BatchpilotError(f"--amp keeps fp32 weights: dtype must be float32 with amp, got {dtype!r}")
    if peak is None:
        pd = peak_dtype(amp, dtype)
        peak = cpu_peak_flops(pd) if dev.type == "cpu" else gpu_peak_flops(torch.cuda.get_device_name(dev), pd)
        if peak is None:
            raise BatchpilotError(f"GPU {torch.cuda.get_device_name(dev)!r} is not in the peak-FLOP/s table; pass peak=")
    start = time.perf_counter()
    timings: dict[int, _Timings] = {}
    truncated = None
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        model = workload.make_model().to(device=dev, dtype=tdtype)
        model.train()
        optimizer = workload.make_optimizer(model.parameters(), workload.base_lr)
        time_steps = functools.partial(_time_steps, policy=policy)
        time_steps(workload, model, optimizer, batches[0], dev, tdtype, 1, 0.0)  # one-time init
        for i, batch in enumerate(batches):  # round 1: warm up and time each batch
            if time_budget_s is not None and timings:
                # the next batch's cost, projected from the last one (step time grows at most linearly)
                last = timings[batches[i - 1]]
                projected = last.median * batch / batches[i - 1] * (warmup_steps + timed_steps)
                if time.perf_counter() - start + projected > time_budget_s:
                    truncated = batch
                    break
            if progress is not None:
                progress(f"throughput: batch {batch}", 0.6 * i / len(batches))
            x, y = _batch(workload, batch, dev, tdtype)
            timing = _Timings(flops=_count_flops(model, workload.loss_sum, x, y, max(1, workload.count_units(y)), policy))
            time_steps(workload, model, optimizer, batch, dev, tdtype, warmup_steps, 0.0)
            timing.add_round(*time_steps(workload, model, optimizer, batch, dev, tdtype, timed_steps, 0.2))
            timings[batch] = timing
        measured = list(timings)
        round_cost = sum(t.median * timed_steps for t in timings.values())
        for r in range(1, rounds):  # interleaved rounds while the budget lasts
            if time_budget_s is not None and time.perf_counter() - start + round_cost > time_budget_s:
                break
            if progress is not None:
                progress(f"throughput: round {r + 1} of {rounds}", 0.6 + 0.4 * r / rounds)
            for batch in measured:
                timings[batch].add_round(*time_steps(workload, model, optimizer, batch, dev, tdtype, timed_steps, 0.05))
    points = [timings[b].point(b, peak.flops_per_s) for b in measured]
    overhead, per_sample = fit_step_time([p.batch for p in points], [p.step_s for p in points])
    residual = math.sqrt(statistics.fmean(((overhead + per_sample * p.batch) / p.step_s - 1) ** 2 for p in points))
    if progress is not None:
        progress("throughput: done", 1.0)
    return ThroughputCurve(
        points=tuple(points), overhead_s=overhead, per_sample_s=per_sample,
        saturation_batch=9 * overhead / per_sample, peak_flops=peak.flops_per_s, peak_source=peak.source,
        device=str(dev), threads=torch.get_num_threads(), truncated_at=truncated, wall_s=time.perf_counter() - start,
        step_model="fit" if len(points) >= 3 and residual <= FIT_MAX_RESIDUAL else "points", fit_residual=residual,
    )


def _time_steps(workload, model, optimizer, batch, dev, tdtype, n_steps, min_time_s: float,
                max_step_s: float = 1.0, policy=None) -> tuple[list[float], list[float], list[float]]:
    """Time ``n_steps`` full steps (more, up to 8x, until ``min_time_s`` is timed: medians of tiny steps
    on a busy machine need many samples; slow steps stop after three). Returns full, micro, optimizer times."""
    steps: list[float] = []
    micros: list[float] = []
    opts: list[float] = []
    while len(steps) < n_steps or (sum(steps) < min_time_s and len(steps) < 8 * n_steps):
        if len(steps) == 3 and min(steps) > max_step_s:
            break
        _sync(dev)
        t0 = time.perf_counter()
        xb, yb = _batch(workload, batch, dev, tdtype)
        with autocast_or_null(policy):
            loss = workload.loss_sum(model(xb), yb) / max(1, workload.count_units(yb))
        loss.backward()
        _sync(dev)
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(dev)
        t2 = time.perf_counter()
        steps.append(t2 - t0)
        micros.append(t1 - t0)
        opts.append(t2 - t1)
    return steps, micros, opts


@dataclass
class _Timings:
    """The timed steps of one batch size over the rounds."""

    flops: float
    steps: list[float] = field(default_factory=list)
    micros: list[float] = field(default_factory=list)
    opts: list[float] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)

    def add_round(self, steps: list[float], micros: list[float], opts: list[float]) -> None:
        if steps:
            self.steps += steps
            self.micros += micros
            self.opts += opts
            self.round_medians.append(statistics.median(steps))

    @property
    def median(self) -> float:
        return statistics.median(self.steps)

    def point(self, batch: int, peak_flops_per_s: float) -> ThroughputPoint:
        step_s = self.median
        # split the median full step in the ratio of the parts' medians, so micro_s + optimizer_s == step_s
        micro_med, opt_med = statistics.median(self.micros), statistics.median(self.opts)
        micro_share = micro_med / (micro_med + opt_med) if micro_med + opt_med > 0 else 1.0
        return ThroughputPoint(
            batch=batch, step_s=step_s, micro_s=step_s * micro_share, optimizer_s=step_s * (1 - micro_share),
            step_s_spread=(max(self.steps) - min(self.steps)) / step_s, flops=self.flops,
            samples_per_s=batch / step_s, mfu=self.flops / step_s / peak_flops_per_s,
            round_step_s=tuple(self.round_medians),
        )


def choose_cpu_threads(workload: Workload, batches: Sequence[int], *, candidates: Sequence[int] | None = None,
                       steps: int = 6, seed: int = 0) -> tuple[int, dict[int, float]]:
    """Pick the torch CPU thread count with the highest samples/s at ``batches`` (geometric mean).

    Small models often run faster on one thread, and on a shared machine extra intra-op threads can
    make steps many times slower; measure rather than guess. The thread setting is restored.

    Returns:
        ``(threads, {threads: geometric-mean samples/s})``.
    """
    before = torch.get_num_threads()
    cands = sorted(set(candidates or (1, before)))
    scores: dict[int, float] = {}
    try:
        for n in cands:
            torch.set_num_threads(n)
            curve = measure_throughput(workload, batch_sizes=list(batches), warmup_steps=1, timed_steps=steps, seed=seed,
                                       peak=PeakFlops(1.0, "unused"), rounds=1)
            scores[n] = float(np.exp(np.mean([math.log(p.samples_per_s) for p in curve.points])))
    finally:
        torch.set_num_threads(before)
    return max(scores, key=scores.get), scores
