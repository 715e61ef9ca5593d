"""Throughput for the adaptive controller: a step-time model fitted to the training steps themselves.

Pollux (Qiao et al. 2021, OSDI, section 4.1) fits its throughput model to the iterations the job runs
anyway instead of profiling every batch up front. Here the model is the single-process part of it:
one plain step (draw, fetch, forward/backward, optimizer step) at batch ``B`` takes::

    step_s(B) = fixed_s + per_sample_s · B

:class:`StepTimer` times the steps the trainer runs (thread CPU time when torch runs one thread, else
wall time) and keeps, per size, the most recent times: an unmonitored step is one plain step at its
batch; a step split in two by the micro-batch monitor gives, per micro-batch, a plain step at the
micro-batch's size (its forward/backward plus the step's draw, fetch and optimizer time; the monitor's
own work is not counted). :func:`fit_step_times` takes the median per size (robust to the odd slow step;
a minimum would be biased towards the sizes timed most often) and a least-squares line over the sizes.
:class:`ThroughputTable` and :func:`measure_throughput` are the older up-front probe
(``AdaptiveDriver(throughput="probe")``).
"""

from __future__ import annotations

import bisect
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from batchpilot.errors import BatchpilotError

EXTRAPOLATION_FACTOR = 4
"""The fit is trusted for batches within this factor of the sizes measured (above the largest, below the smallest)."""
PER_SAMPLE_FLOOR = 0.05
"""Least share of the step time at the largest measured size that the per-sample term may take: a flatter
fit (timing noise between two close sizes) would promise nearly free samples at every larger batch."""
WINDOW = 16
"""Most recent times kept per size."""


def step_clock() -> Callable[[], float]:
    """The thread's CPU time when torch runs one thread (other processes' load does not inflate it), else
    wall time (the thread's CPU time would miss the other threads' work)."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


@dataclass(frozen=True)
class StepTimeFit:
    """``step_s(B) = fixed_s + per_sample_s · B``, fitted on ``batches`` (median ``step_s`` each)."""

    fixed_s: float
    per_sample_s: float
    batches: tuple[int, ...]
    step_s: tuple[float, ...]

    def predict_s(self, batch: int) -> float:
        """Predicted seconds of one plain step at ``batch``."""
        return self.fixed_s + self.per_sample_s * batch

    def samples_per_s(self, batch: int) -> float:
        """Predicted samples/s at ``batch``."""
        return batch / max(self.predict_s(batch), 1e-12)

    def trusted(self, batch: int, factor: float = EXTRAPOLATION_FACTOR) -> bool:
        """Whether ``batch`` is within ``factor`` of the sizes measured."""
        return self.batches[0] / factor <= batch <= self.batches[-1] * factor


def fit_step_times(times: dict[int, Sequence[float]], floor: float = PER_SAMPLE_FLOOR) -> StepTimeFit | None:
    """Median step time per size, then least squares ``fixed_s + per_sample_s · B`` over the sizes.

    Both terms are kept >= 0 (a negative one is clamped and the other refitted), and ``per_sample_s``
    is at least ``floor`` times the per-sample time at the largest size. ``None`` with fewer than two sizes.
    """
    pts = [(b, statistics.median(ts)) for b, ts in sorted(times.items()) if ts]
    if len(pts) < 2:
        return None
    bs, ts = [float(b) for b, _ in pts], [t for _, t in pts]
    mb, mt = statistics.fmean(bs), statistics.fmean(ts)
    slope = sum((b - mb) * (t - mt) for b, t in zip(bs, ts)) / sum((b - mb) ** 2 for b in bs)
    low = floor * ts[-1] / bs[-1]
    if slope < low:
        slope = low
    fixed = mt - slope * mb
    if fixed < 0:  # a line through the origin instead (time proportional to the batch)
        fixed, slope = 0.0, max(low, sum(b * t for b, t in zip(bs, ts)) / sum(b * b for b in bs))
    return StepTimeFit(fixed, slope, tuple(b for b, _ in pts), tuple(ts))


class StepTimer:
    """Times the trainer's steps from the batch driver's hooks and keeps the recent times per size.

    Call :meth:`start` when the step is planned, :meth:`fetched` before its first forward,
    :meth:`micro_done` after each backward (before any monitor work) and :meth:`hook_done` after that work,
    and :meth:`end` after the optimizer step. The first time at a size and every time of the first step at
    a new batch are warm-up and dropped. Evaluation happens outside these marks.

    Args:
        clock: seconds (default :func:`step_clock`, chosen at each step).
        window: the most recent times kept per size.
    """

    def __init__(self, clock: Callable[[], float] | None = None, window: int = WINDOW) -> None:
        self.clock, self.window = clock, window
        self.times: dict[int, list[float]] = {}
        self._seen: set[int] = set()
        self._prev_batch: int | None = None
        self._now: Callable[[], float] = time.perf_counter
        self._t0 = self._mark = None
        self._micro: list[float] = []
        self._hook_s = 0.0

    def start(self) -> None:
        self._now = self.clock or step_clock()
        self._t0 = self._mark = self._now()
        self._micro, self._hook_s = [], 0.0

    def fetched(self) -> None:
        if self._t0 is not None and not self._micro:
            self._mark = self._now()

    def micro_done(self) -> None:
        if self._t0 is not None:
            t = self._now()
            self._micro.append(t - self._mark)
            self._mark = t

    def hook_done(self) -> None:
        if self._t0 is not None:
            t = self._now()
            self._hook_s += t - self._mark
            self._mark = t

    def end(self, batch: int, micro_sizes: Sequence[int], whole: bool, split: bool) -> None:
        """Finish the step: ``whole``: record it as a plain step at ``batch``; ``split``: record one plain
        step per micro-batch (sizes ``micro_sizes``) from its forward/backward and the step's other time."""
        if self._t0 is None:
            return
        total_s = self._now() - self._t0
        self._t0 = None
        warm = batch != self._prev_batch
        self._prev_batch = batch
        if warm or len(self._micro) != len(micro_sizes):
            self._seen.update(micro_sizes if split else (batch,))
            return
        if whole:
            self.add(batch, total_s - self._hook_s)
        elif split:
            other_s = total_s - self._hook_s - sum(self._micro)
            for size, micro_s in zip(micro_sizes, self._micro):
                self.add(size, other_s + micro_s)

    def add(self, batch: int, step_s: float) -> None:
        """One plain step of ``step_s`` at ``batch`` (the first at a size is dropped as its warm-up)."""
        if batch not in self._seen:
            self._seen.add(batch)
            return
        kept = self.times.setdefault(batch, [])
        kept.append(float(step_s))
        del kept[:-self.window]

    def fit(self) -> StepTimeFit | None:
        return fit_step_times(self.times)

    def state_dict(self) -> dict:
        return {"times": [[b, list(ts)] for b, ts in sorted(self.times.items())], "seen": sorted(self._seen),
                "prev_batch": self._prev_batch}

    def load_state_dict(self, state: dict) -> None:
        self.times = {int(b): [float(t) for t in ts] for b, ts in state["times"]}
        self._seen = {int(b) for b in state["seen"]}
        self._prev_batch = None if state["prev_batch"] is None else int(state["prev_batch"])
        self._t0 = None


@dataclass(frozen=True)
class ThroughputTable:
    """Measured samples/s at a few batches; other batches interpolate the step *time* linearly."""

    batches: tuple[int, ...]
    samples_per_s: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.batches or len(self.batches) != len(self.samples_per_s):
            raise BatchpilotError("throughput table needs as many samples/s as batches (at least one)")
        if list(self.batches) != sorted(set(self.batches)) or any(not s > 0 for s in self.samples_per_s):
            raise BatchpilotError(f"throughput table needs increasing batches and samples/s > 0, got {self}")

    def __call__(self, batch: int) -> float:
        """Samples/s at ``batch`` (interpolated in step time, extrapolated from the end segments)."""
        bs, times = self.batches, [b / s for b, s in zip(self.batches, self.samples_per_s)]
        if len(bs) == 1:
            return self.samples_per_s[0]
        i = min(max(bisect.bisect_left(bs, batch), 1), len(bs) - 1)
        b0, b1, t0, t1 = bs[i - 1], bs[i], times[i - 1], times[i]
        t = t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
        return batch / max(t, 1e-12)


def measure_throughput(workload, model: torch.nn.Module, batches: Sequence[int], micro_for: Callable[[int], int],
                       dtype: torch.dtype = torch.float32, repeats: int = 3, seed: int = 0) -> ThroughputTable:
    """Time whole training steps (fetch, forward/backward per micro-batch, optimizer step) at each batch.

    Runs on a deep copy of ``model`` with a fresh optimizer, under a forked RNG: the caller's model,
    optimizer and random state are untouched. One warm-up round, then ``repeats`` rounds of one step at
    every batch, in an order that rotates round by round (a change of the machine's load hits every batch
    alike). Reports the fastest of each batch's timed steps (other work only ever adds time), timed by
    :func:`step_clock`.
    """
    from batchpilot.workloads.data import fetch, split_micro
    from batchpilot.train.accumulation import accumulate_gradients

    n = workload.num_train
    clock = step_clock()
    times: dict[int, list[float]] = {b: [] for b in batches}
    with torch.random.fork_rng(devices=[]):
        probe = copy.deepcopy(model)
        opt = workload.make_optimizer(probe.parameters(), workload.base_lr)
        gen = torch.Generator().manual_seed(seed)
        order = list(batches)
        for r in range(repeats + 1):
            k = r % len(order)
            for b in order[k:] + order[:k]:
                t0 = clock()
                idx = torch.randperm(n, generator=gen)[:b]
                micro = []
                for part in split_micro(idx, micro_for(b)):
                    x, y = fetch(workload.train_data, part)
                    micro.append((x.to(dtype) if x.is_floating_point() else x, y))
                accumulate_gradients(probe, micro, workload.loss_sum, workload.count_units)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if r > 0:
                    times[b].append(clock() - t0)
    return ThroughputTable(tuple(batches), tuple(b / min(times[b]) for b in batches))
