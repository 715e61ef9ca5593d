"""The noise probe: a short training run at the base batch that measures B_noise as it goes.

The run trains a fresh model at the workload's base batch and base LR (the point the user
tuned), split into micro-batches so that :class:`~batchpilot.noise.microbatch.GradientNoiseScale` gets its
two batch sizes for free. It records the smoothed B_simple at every evaluation and stops at the
target or at the time budget. The noise scale grows as the loss falls (McCandlish et al. 2018,
Fig. 5), so one number measured at the start would understate it; the probe keeps them all, and
:func:`batchpilot.plan.goodput.effective_noise_scale` combines them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from batchpilot.errors import BatchpilotError
from batchpilot.noise.microbatch import GradientNoiseScale
from batchpilot.plan.goodput import effective_noise_scale
from batchpilot.throughput.measure import Progress
from batchpilot.train import TrainConfig, Trainer
from batchpilot.workloads import Workload


@dataclass(frozen=True)
class NoisePoint:
    """The smoothed noise scale after ``step`` optimizer steps, in samples (not tokens)."""

    step: int
    samples: int
    b_noise: float
    b_noise_low: float
    b_noise_high: float
    metric: float | None
    val_loss: float | None = None


@dataclass(frozen=True)
class NoiseProbe:
    """What the probe measured.

    Attributes:
        points: B_noise over the run.
        batch: the global batch trained (the base batch).
        micro_batch: the micro-batch the monitor compared against the global batch.
        units_per_sample: loss units per sample (1, or tokens per sequence): B_noise is divided by it.
        phases: ``(samples_seen, b_noise)`` at the end of each phase of the run, each the ratio of the
            phase's mean tr(Σ) to its mean |G|² (the per-step estimates are unbiased, so their means are).
        b_noise_effective: the one value the plan uses (see :func:`effective_noise_scale`).
        b_noise_low, b_noise_high: its 80% bootstrap interval (steps resampled within phases).
        b_noise_last: the last measured value (the noise scale late in the run).
        steps_to_target, samples_to_target, time_to_target_s: at the base batch, ``None`` if not reached.
        steps, wall_s: how long the probe ran.
        status: ``target_reached``, ``budget`` (time ran out) or ``completed`` (epoch cap).
        loss_phases: ``(val_loss, b_noise)`` per phase of the run: each phase's ratio-of-means B_noise
            against the geometric mean validation loss of its evaluations (the points of the trend
            against the loss, :mod:`.noise_trend`).
        lr: the LR the probe trained with.
    """

    points: tuple[NoisePoint, ...]
    batch: int
    micro_batch: int
    units_per_sample: float
    phases: tuple[tuple[int, float], ...]
    b_noise_effective: float
    b_noise_low: float
    b_noise_high: float
    b_noise_last: float
    steps_to_target: int | None
    samples_to_target: int | None
    time_to_target_s: float | None
    steps: int
    wall_s: float
    status: str
    loss_phases: tuple[tuple[float, float], ...] = ()
    lr: float | None = None

    def to_dict(self) -> dict:
        """Plain data."""
        return asdict(self)


def phase_noise_scales(history: list[tuple[float, float]], samples_at: list[int], units_per_sample: float,
                       *, steps_per_phase: int = 100, max_phases: int = 6) -> list[tuple[int, float]]:
    """Split per-step ``(g_sq, trace_sigma)`` estimates into phases; B_noise of each, in samples.

    A phase holds at least ``steps_per_phase`` steps (there are at most ``max_phases``): the ratio of
    means over a phase is far steadier than a short EMA, which matters for the harmonic mean.
    """
    n = min(len(history), len(samples_at))
    if n == 0:
        return []
    k = max(1, min(max_phases, n // steps_per_phase))
    bounds = [round(i * n / k) for i in range(k + 1)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        g = sum(h[0] for h in history[a:b]) / (b - a)
        t = sum(h[1] for h in history[a:b]) / (b - a)
        out.append((samples_at[b - 1], (t / g if g > 0 else float("inf")) / units_per_sample))
    return out


def loss_phase_noise_scales(history: list[tuple[float, float]], samples_at: list[int], units_per_sample: float,
                            points: "list[NoisePoint]", *, max_phases: int = 8,
                            min_steps: int = 20) -> list[tuple[float, float]]:
    """``(val_loss, B_noise)`` per phase: the phases of :func:`phase_noise_scales` (finer), each paired
    with the geometric mean validation loss of the evaluations inside it. Phases without one are dropped."""
    n = min(len(history), len(samples_at))
    phases = phase_noise_scales(history, samples_at, units_per_sample, steps_per_phase=min_steps,
                                max_phases=max_phases)
    out = []
    start = 0
    for end, b in phases:
        losses = [p.val_loss for p in points if start < p.samples <= end and p.val_loss and p.val_loss > 0]
        start = end
        if losses and n:
            out.append((math.exp(sum(math.log(l) for l in losses) / len(losses)), b))
    return out


def effective_noise_interval(history: list[tuple[float, float]], samples_at: list[int], units_per_sample: float,
                             base_batch: int, *, confidence: float = 0.8, resamples: int = 200,
                             seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the effective B_noise: resample the steps within each phase, recompute.

    Uses a private NumPy generator (no global RNG is touched).
    """
    n = min(len(history), len(samples_at))
    if n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    arr = np.asarray(history[:n], dtype=np.float64)
    values = []
    for _ in range(resamples):
        phases: list[tuple[int, float]] = []
        k = max(1, min(6, n // 100))
        bounds = [round(i * n / k) for i in range(k + 1)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            pick = arr[rng.integers(a, b, size=b - a)]
            g, t = pick[:, 0].mean(), pick[:, 1].mean()
            phases.append((samples_at[b - 1], (t / g if g > 0 else math.inf) / units_per_sample))
        values.append(effective_noise_scale(phases, base_batch))
    vals = np.sort(np.asarray(values, dtype=np.float64))
    tail = (1 - confidence) / 2
    last = len(vals) - 1
    return float(vals[int(math.floor(tail * last))]), float(vals[int(math.ceil((1 - tail) * last))])


class _Budget(Exception):
    pass


def probe_micro_batch(base_batch: int) -> int:
    """Micro-batch for the probe: a quarter of the base batch when that is >= 16, else half (>= 1)."""
    if base_batch < 2:
        raise BatchpilotError(f"the noise probe needs a base batch >= 2 to split, got {base_batch}")
    if base_batch % 4 == 0 and base_batch // 4 >= 16:
        return base_batch // 4
    if base_batch % 2 == 0:
        return base_batch // 2
    for m in range(base_batch // 2, 0, -1):
        if base_batch % m == 0:
            return m
    return 1


def probe_noise(workload: Workload, *, time_budget_s: float = 60.0, max_epochs: float = 30.0, seed: int = 0,
                evals_per_epoch: int = 5, progress: Progress | None = None, evals_per_budget: int = 40,
                step_s: float | None = None) -> NoiseProbe:
    """Train at the base batch with accumulation and record B_noise at every evaluation.

    Args:
        workload: what to train (a fresh model is built; the global RNG is restored after).
        time_budget_s: stop after this much training time.
        max_epochs: stop after this many epochs.
        seed: the run's seed.
        evals_per_epoch: evaluations (and noise points) per epoch.
        progress: optional ``progress(description, fraction)``.
        evals_per_budget, step_s: with the measured step time at the base batch, evaluate often enough
            for about ``evals_per_budget`` evaluations within the budget (when that is more often than
            ``evals_per_epoch``): a short probe still gets a loss curve to fit.
    """
    batch = workload.base_batch
    micro = probe_micro_batch(batch)
    steps_per_epoch = math.ceil(workload.num_train / batch)
    eval_every = max(1, steps_per_epoch // evals_per_epoch)
    if step_s and step_s > 0:
        eval_every = max(1, min(eval_every, int(time_budget_s / step_s / evals_per_budget)))
    config = TrainConfig(global_batch=batch, micro_batch_per_rank=micro, epochs=max_epochs, eval_every=eval_every,
                         stop_at_target=workload.target is not None, seed=seed)
    monitor = GradientNoiseScale(ema_decay=0.95)
    units = {"units": 0, "samples": 0}

    def after_micro(index: int, n_units: int) -> None:
        units["units"] += n_units
        monitor.after_micro(index, n_units)

    trainer = Trainer(workload, config, after_micro=after_micro, on_step=lambda r: on_step(r))
    monitor.attach(lambda: trainer.model)
    points: list[NoisePoint] = []
    reached: dict[str, float] = {}
    start = time.perf_counter()
    metric_name, target = workload.metric_name, workload.target

    samples_at: list[int] = []

    def on_step(record: dict) -> None:
        units["samples"] = record["samples"]
        samples_at.append(record["samples"])
        if metric_name in record:
            est = monitor.estimate()
            ups = units["units"] / max(1, units["samples"])
            points.append(NoisePoint(record["step"], record["samples"], est.b_simple / ups,
                                     est.b_simple_low / ups, est.b_simple_high / ups, record[metric_name],
                                     record.get("val_loss")))
            if target is not None and not reached and target.reached(record[metric_name]):
                reached.update(step=record["step"], samples=record["samples"], wall_s=record["wall_s"])
        if progress is not None:
            frac = (time.perf_counter() - start) / time_budget_s
            progress(f"noise probe: step {record['step']}, B_noise {points[-1].b_noise:.0f}" if points else
                     f"noise probe: step {record['step']}", min(0.99, frac))
        if time.perf_counter() - start > time_budget_s:
            raise _Budget

    status = "target_reached"
    try:
        result = trainer.run()
        if result.status == "interrupted":
            raise KeyboardInterrupt
        status = "target_reached" if result.status == "target_reached" else "completed"
    except _Budget:
        status = "budget"
    monitor.end_step()
    wall = time.perf_counter() - start
    if not points:
        raise BatchpilotError(f"the noise probe of {workload.name!r} made no measurement in {wall:.0f} s; "
                              "give it a longer budget")
    ups = units["units"] / max(1, units["samples"])
    phases = phase_noise_scales(monitor.history, samples_at, ups)
    b_eff = effective_noise_scale(phases, batch)
    low, high = effective_noise_interval(monitor.history, samples_at, ups, batch, seed=seed)
    return NoiseProbe(
        points=tuple(points), batch=batch, micro_batch=micro, units_per_sample=ups, phases=tuple(phases),
        b_noise_effective=b_eff, b_noise_low=low, b_noise_high=high, b_noise_last=points[-1].b_noise,
        steps_to_target=int(reached["step"]) if reached else None,
        samples_to_target=int(reached["samples"]) if reached else None,
        time_to_target_s=reached.get("wall_s"), steps=points[-1].step, wall_s=wall, status=status,
        loss_phases=tuple(loss_phase_noise_scales(monitor.history, samples_at, ups, points)), lr=trainer.lr,
    )
