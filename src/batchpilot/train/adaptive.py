"""The noise-adaptive batch controller: move the batch with the gradient noise scale, up or down.

Statistical efficiency (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"; the
form used by Pollux, Qiao et al. 2021, OSDI): relative to a base batch ``B0``, one step at batch
``B`` makes the progress of ``r = (B/B0) · E(B)`` base steps, with::

    E(B) = (B_noise + B0) / (B_noise + B)

(``E > 1`` and ``B/B0 < r < 1`` below the base batch: a smaller batch is worth fewer base steps, but
more per sample). ``r`` is the AdaScale gain (Johnson et al. 2020, "AdaScale SGD"): ``(σ² + μ²) / (σ²/S + μ²)`` with
``S = B/B0``, ``σ² = tr(Σ)/B0``, ``μ² = |G|²`` and ``B_noise = tr(Σ)/|G|²``. Goodput is
``samples_per_s(B) · E(B)``; the controller picks the candidate batch of highest predicted goodput
and **switches only when it beats the current batch's by a margin** (Pollux: 5%). The noise scale
is itself noisy, so the switch must also hold at the cautious end of the monitor's bootstrap
interval (its low end for a larger batch, its high end for a smaller one): the batch does not flap
on an estimate that cannot tell the two apart. The candidates are ``B0 · 2^k`` for positive and
negative ``k``, from a floor (``min_batch``, by default ``max(2, B0 // 8)``) to the
memory/accumulation limit: Pollux's goodput is defined at every batch, and a run started above its
best batch must be able to come down. The LR follows the AdaScale gain (SGD-like optimizers; AdaScale is
derived for SGD) or the run's scaling rule (the Adam family: square root, Malladi et al. 2022).

:func:`decide_batch` is a pure function of (current batch, noise scale, throughput, candidates);
:class:`AdaptiveDriver` runs it inside the reference trainer with a live monitor: by default the
micro-batch one (:class:`~batchpilot.noise.microbatch.GradientNoiseScale`), which splits the steps it
measures; or the per-example one (:class:`~batchpilot.noise.per_example.PerExampleNoiseScale`), which
measures every step at its own batch without splitting it, at a higher cost per observed step. Its
samples/s come from a step-time model fitted to the run's own steps (:mod:`batchpilot.train.step_times`,
as Pollux fits its throughput model to the iterations it observes), or from an up-front probe. Each
decision reads the noise scale over the last few observed steps (``noise_window``), not the monitor's
EMAs over the whole run, which lag the fast fall of ``|G|²`` early in training.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch

from batchpilot.train.batching import BatchDriver, micro_batch_for
from batchpilot.errors import BatchpilotError
from batchpilot.scaling.efficiency import efficiency as _efficiency
from batchpilot.scaling.lr_rules import ADAPTIVE_OPTIMIZERS
from batchpilot.train.step_times import StepTimer, ThroughputTable, measure_throughput

POLLUX_MARGIN = 0.05
"""Switch only when the predicted goodput improves by at least this fraction (Pollux)."""
DECISION_CONFIDENCE = 0.5
"""Coverage of the noise-scale interval a switch must hold across (the interquartile range): an 80%
interval from the few noisy steps of early training is so wide that it freezes the batch."""


def efficiency(batch: int, b_noise: float, base_batch: int) -> float:
    """Statistical efficiency ``E(B) = (B_noise + B0) / (B_noise + B)``
    (:func:`batchpilot.scaling.efficiency.efficiency`), with a negative or undefined measured noise scale
    read as 0 (the monitor's estimate can dip below 0 on a noisy step)."""
    return _efficiency(batch, b_noise if b_noise > 0 else 0.0, base_batch)


def adascale_gain(batch: int, b_noise: float, base_batch: int) -> float:
    """AdaScale gain ``r = (B/B0) · E(B)``, between 1 and ``B/B0`` for ``B >= B0`` (Johnson et al. 2020)."""
    return batch / base_batch * efficiency(batch, b_noise, base_batch)


def goodput(batch: int, b_noise: float, base_batch: int, samples_per_s: Callable[[int], float]) -> float:
    """Goodput ``samples_per_s(B) · E(B)``: base-batch-equivalent samples per second (Pollux)."""
    return samples_per_s(batch) * efficiency(batch, b_noise, base_batch)


def candidate_batches(min_batch: int, max_batch: int, quantum: int = 1, floor: int | None = None) -> tuple[int, ...]:
    """``min_batch · 2^k`` up to ``max_batch``, plus ``max_batch``, each a multiple of ``quantum``.

    Args:
        min_batch: the batch the powers of two start from (the controller's base batch ``B0``).
        max_batch: the largest candidate (memory/accumulation limit), included.
        quantum: every candidate is rounded down to a multiple of this (at least ``quantum``).
        floor: if given (``1 <= floor <= min_batch``), also ``min_batch // 2^k`` down to ``floor``, plus
            ``floor``: the batches below the base batch.
    """
    if not 1 <= min_batch <= max_batch:
        raise BatchpilotError(f"need 1 <= min batch <= max batch, got {min_batch}, {max_batch}")
    if floor is not None and not 1 <= floor <= min_batch:
        raise BatchpilotError(f"need 1 <= floor <= min batch, got floor {floor}, min batch {min_batch}")
    out, b = set(), min_batch
    while b <= max_batch:
        out.add(b)
        b *= 2
    out.add(max_batch)
    if floor is not None:
        b = min_batch
        while b >= floor:
            out.add(b)
            b //= 2
        out.add(floor)
    return tuple(sorted({max(quantum, (c // quantum) * quantum) for c in out}))


@dataclass(frozen=True)
class Decision:
    """One controller decision (plain data for logs and reports)."""

    step: int
    current: int
    batch: int
    switched: bool
    b_noise: float
    current_goodput: float
    best_goodput: float
    b_noise_low: float = float("nan")
    b_noise_high: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


def decide_batch(
    current: int,
    b_noise: float,
    samples_per_s: Callable[[int], float] | Mapping[int, float],
    candidates: Sequence[int],
    base_batch: int,
    margin: float = POLLUX_MARGIN,
    step: int = 0,
    b_noise_range: tuple[float, float] | None = None,
) -> Decision:
    """Pick the batch of highest predicted goodput; keep ``current`` unless that beats it by ``margin``.

    Args:
        current: the batch in use.
        b_noise: the measured gradient noise scale (``B_simple``), in samples.
        samples_per_s: measured throughput per batch (callable or mapping).
        candidates: the batches allowed, above and below ``current`` (already within the floor and the
            memory/accumulation limit).
        base_batch: ``B0`` of the efficiency (the batch the LR was tuned at).
        margin: required relative goodput improvement to switch (Pollux: 0.05).
        step: recorded in the decision.
        b_noise_range: an interval for ``b_noise`` (e.g. the monitor's bootstrap); if given, the switch
            must also beat the margin at its low end (moving up) or high end (moving down).

    Returns:
        The :class:`Decision`; ``batch == current`` when not switching or when ``b_noise`` is not a number.
    """
    if not candidates:
        raise BatchpilotError("decide_batch needs at least one candidate batch")
    if margin < 0:
        raise BatchpilotError(f"margin must be >= 0, got {margin!r}")
    speed = samples_per_s.__getitem__ if isinstance(samples_per_s, Mapping) else samples_per_s
    low, high = b_noise_range if b_noise_range is not None else (float("nan"), float("nan"))
    if math.isnan(b_noise):
        return Decision(step, current, current, False, b_noise, float("nan"), float("nan"), low, high)
    now = goodput(current, b_noise, base_batch, speed)
    best = max(candidates, key=lambda b: (goodput(b, b_noise, base_batch, speed), -b))
    best_gp = goodput(best, b_noise, base_batch, speed)
    switch = best != current and best_gp > (1 + margin) * now
    if switch and b_noise_range is not None:
        cautious = low if best > current else high
        switch = not math.isnan(cautious) and (
            goodput(best, cautious, base_batch, speed) > (1 + margin) * goodput(current, cautious, base_batch, speed))
    return Decision(step, current, best if switch else current, switch, b_noise, now, best_gp, low, high)


ESTIMATORS = ("per-example", "micro-batch")
THROUGHPUT_MODES = ("steps", "probe")


def make_monitor(estimator: str):
    """A fresh noise monitor for the controller: ``per-example`` norms (every step, no split) or
    ``micro-batch`` (two batch sizes from splitting the monitored steps in two)."""
    if estimator == "per-example":
        from batchpilot.noise.per_example import PerExampleNoiseScale

        return PerExampleNoiseScale(confidence=DECISION_CONFIDENCE)
    if estimator == "micro-batch":
        from batchpilot.noise.microbatch import GradientNoiseScale

        return GradientNoiseScale(confidence=DECISION_CONFIDENCE)
    raise BatchpilotError(f"noise estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")


def default_min_batch(base_batch: int) -> int:
    """The controller's default floor: ``max(2, B0 // 8)``, capped at ``B0`` (three halvings below the
    base batch; at least 2 so a micro-batch monitor can still split a step in two)."""
    return min(base_batch, max(2, base_batch // 8))


class AdaptiveDriver(BatchDriver):
    """Runs :func:`decide_batch` every ``decide_every`` steps with the live noise monitor.

    The candidates are ``ref_batch · 2^k`` from ``min_batch`` up to ``max_batch``, so the controller can
    shrink as well as grow; the LR follows the same rule in both directions (the AdaScale gain is below
    1 under the base batch) and a move either way needs the same margin.

    With the per-example monitor (:mod:`batchpilot.noise.per_example`: Goodfellow 2015;
    Gray et al. 2023/2024) the noise scale comes from the step's own backward, so every step is
    measured at its own batch, unsplit. With the micro-batch monitor every ``monitor_every``-th step
    is split into at least two micro-batches (its two batch sizes, McCandlish et al. 2018) and the
    other steps run unsplit and unmeasured. A per-example monitor's hooks are switched off on the
    steps it does not observe. Throughput (``throughput="steps"``, the default) comes from a step-time
    model fitted to the run's own steps (:mod:`batchpilot.train.step_times`, as Pollux fits its model to
    the iterations it observes): the unsplit steps time the current batch, the split steps its half;
    a decision considers only candidates within :data:`~batchpilot.train.step_times.EXTRAPOLATION_FACTOR`
    of a timed size, so the model gains a point wherever the batch moves. While only one size is timed
    (the per-example monitor does not split its steps) a decision first probes the neighbouring
    candidates on a copy of the model. ``throughput="probe"`` measures every candidate once, at the first
    decision, on a copy of the model (the older way). Probe time counts as training time. The LR multiplier is the
    AdaScale gain (Johnson et al. 2020) for SGD-like optimizers and the run's rule for the Adam family
    (``lr_mode='auto'``).

    Args:
        max_batch: the memory/accumulation limit.
        min_batch: the smallest candidate; ``None``: :func:`default_min_batch` (``max(2, B0 // 8)``).
            Between 1 and ``ref_batch``, and at least 2 with the micro-batch monitor (its monitored
            steps are split in two).
        monitor: a noise monitor (:class:`~batchpilot.noise.per_example.PerExampleNoiseScale` or
            :class:`~batchpilot.noise.microbatch.GradientNoiseScale`); one is made from ``estimator``
            if ``None``.
        estimator: ``per-example`` or ``micro-batch``, for the monitor made here.
        decide_every: steps between decisions.
        min_updates: monitored steps before the first decision.
        monitor_every: measure the noise scale on every this many steps (a fixed interval); ``None``
            (the default): an interval that starts at every 4th step for the micro-batch monitor and at
            every step for the per-example one, doubles after each decision that keeps the batch (up to
            ``max_monitor_every``) and returns to its start after a switch: the estimate is fresh while
            the batch moves and costs little once it has settled (a split step costs +10–80% on small
            CPU models, exact per-example norms +20–70%, docs/noise.md).
        max_monitor_every: the longest interval of the default schedule.
        margin: Pollux's switching margin (Qiao et al. 2021).
        lr_mode: ``adascale``, ``rule`` or ``auto``.
        throughput: ``steps`` (a model fitted to the run's step times) or ``probe`` (one probe of every
            candidate on a copy of the model at the first decision).
        clock: the step timer's clock (default: thread CPU time with one torch thread, else wall time).
        noise_window: each decision reads the noise scale as the ratio of the means of the last this many
            observed steps (``monitor.estimate(recent=...)``, with its bootstrap interval over those steps);
            ``None``: the monitor's EMAs over all observed steps. Early in training ``|G|²`` falls by
            10–100× within a few dozen steps, and the EMAs, which weigh steps by age and not by size,
            keep reading the early steps' low ratio long after: on charlm (batch 32, every 4th step
            observed) 7 sequences at step 80 where the last 8 observed steps give 55 and a frozen-weight
            estimate 28 (docs/large-batch.md). The window follows the noise scale as it moves, at the
            price of a wider interval, which the switching rule already accounts for.
        **kwargs: see :class:`~batchpilot.train.batching.BatchDriver`.
    """

    def __init__(self, *, max_batch: int, min_batch: int | None = None, monitor=None, estimator: str = "micro-batch",
                 decide_every: int = 8,
                 min_updates: int = 4, monitor_every: int | None = None, max_monitor_every: int = 16,
                 margin: float = POLLUX_MARGIN, lr_mode: str = "auto", throughput: str = "steps",
                 clock: Callable[[], float] | None = None, noise_window: int | None = 8, **kwargs) -> None:
        super().__init__(**kwargs)
        if noise_window is not None and (isinstance(noise_window, bool) or not isinstance(noise_window, int)
                                         or noise_window < 2):
            raise BatchpilotError(f"noise window must be an integer >= 2 (observed steps) or None, got {noise_window!r}")
        self.noise_window = noise_window
        if lr_mode not in ("auto", "adascale", "rule"):
            raise BatchpilotError(f"lr mode must be auto, adascale or rule, got {lr_mode!r}")
        if throughput not in THROUGHPUT_MODES:
            raise BatchpilotError(f"throughput must be one of {', '.join(THROUGHPUT_MODES)}, got {throughput!r}")
        if monitor is None:
            monitor = make_monitor(estimator)
        self.monitor, self.max_batch = monitor, max_batch
        self.per_example = not getattr(monitor, "needs_accumulation", True)
        self.backoff = monitor_every is None
        if monitor_every is None:
            monitor_every = 1 if self.per_example else 4
        self._first_every = monitor_every
        for name, v in (("monitor_every", monitor_every), ("max_monitor_every", max_monitor_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BatchpilotError(f"{name} must be an integer >= 1, got {v!r}")
        self.max_monitor_every = max_monitor_every
        self._next_observed = 0
        self.observed_steps: list[int] = []
        """0-based steps the monitor observed."""
        self.decide_every, self.min_updates, self.margin, self.lr_mode = decide_every, min_updates, margin, lr_mode
        self.monitor_every = monitor_every
        self._monitoring = False
        self.probe_s = 0.0
        """Seconds the throughput probes took (counted as training time by the trainer)."""
        self.probed: list[int] = []
        """The batches probed on a copy of the model (one warm-up and three timed steps each)."""
        self.throughput_mode, self.step_timer = throughput, StepTimer(clock)
        if min_batch is None:
            min_batch = default_min_batch(self.ref_batch)
        lowest = 1 if self.per_example else min(2, self.ref_batch)
        if isinstance(min_batch, bool) or not isinstance(min_batch, int) or not lowest <= min_batch <= self.ref_batch:
            raise BatchpilotError(f"min batch must be an integer from {lowest} (this monitor) to the starting batch "
                                  f"{self.ref_batch}, got {min_batch!r}")
        self.min_batch = min_batch
        self.candidates = candidate_batches(self.ref_batch, max_batch, floor=min_batch)
        self.current = self.ref_batch
        self.b_noise = float("nan")
        self.throughput: ThroughputTable | None = None
        """Samples/s per batch if fixed (the probe's table, or one a caller sets); else the step-time fit."""
        self.decisions: list[dict] = []
        self._units = self._samples = 0
        self._workload = self._model_fn = None
        self._dtype = torch.float32

    def bind(self, model_fn: Callable[[], torch.nn.Module], workload, dtype: torch.dtype, family: str) -> None:
        """Give the driver the live model (for the monitor and a throughput probe)."""
        self._model_fn, self._workload, self._dtype = model_fn, workload, dtype
        self.monitor.attach(model_fn)
        bind_now = getattr(self.monitor, "bind_model", None)
        if bind_now is not None:  # hooks before the first forward: the first step is observed too
            bind_now(model_fn())
        if self.lr_mode == "auto":
            self.lr_mode = "rule" if family.lower() in ADAPTIVE_OPTIMIZERS else "adascale"

    def min_micro_batches(self, step: int) -> int:
        if self.backoff:
            self._monitoring = step >= self._next_observed
            if self._monitoring:
                self._next_observed = step + self.monitor_every
        else:
            self._monitoring = step % self.monitor_every == 0
        if self._monitoring and (not self.observed_steps or self.observed_steps[-1] != step):
            self.observed_steps.append(step)
        if hasattr(self.monitor, "active"):
            self.monitor.active = self._monitoring
        if self.throughput_mode == "steps":
            self.step_timer.start()
        return 2 if self._monitoring and not self.per_example else 1

    def before_accumulate(self) -> None:
        self.step_timer.fetched()

    def after_micro(self, index: int, units: int) -> None:
        """Feed the monitor on monitored steps (the trainer's ``after_micro`` hook); time the backward."""
        self.step_timer.micro_done()
        if self._monitoring:
            self.monitor.after_micro(index, units)
            self._units += int(units)
        self.step_timer.hook_done()

    def batch_at(self, step: int, samples: int) -> tuple[int, float | None]:
        if self.lr_mode == "adascale":
            b_noise = self.b_noise if not math.isnan(self.b_noise) else 0.0
            return self.current, adascale_gain(self.current, b_noise, self.ref_batch)
        return self.current, None

    def record_fields(self) -> dict[str, float]:
        return {"b_noise": self.b_noise if math.isfinite(self.b_noise) else None}  # type: ignore[dict-item]

    def after_step(self, step: int, batch: int) -> None:
        split = self._monitoring and not self.per_example
        micro = micro_batch_for(batch, self.micro_cap, 2 if split else 1)
        n = math.ceil(batch / micro)
        self.step_timer.end(batch, [micro] * (n - 1) + [batch - micro * (n - 1)], not self._monitoring, split)
        if self._monitoring:
            self._samples += batch
            self.monitor.end_step()  # finish this step's estimate now (the monitor would at its next step)
        if step % self.decide_every or self.monitor.n_updates < self.min_updates:
            return
        est = self.monitor.estimate() if self.noise_window is None else self.monitor.estimate(recent=self.noise_window)
        units_per_sample = self._units / max(1, self._samples)
        if not units_per_sample > 0:
            return
        self.b_noise = est.b_simple / units_per_sample
        b_range = (est.b_simple_low / units_per_sample, est.b_simple_high / units_per_sample)
        if math.isnan(self.b_noise):
            return
        speed, candidates, fit = self._throughput()
        if speed is None:
            return
        d = decide_batch(self.current, self.b_noise, speed, candidates, self.ref_batch,
                         self.margin, step=step, b_noise_range=b_range)
        record = d.to_dict()
        if fit is not None:
            record.update(fixed_s=fit.fixed_s, per_sample_s=fit.per_sample_s)
        self.decisions.append(record)
        self.current = d.batch
        if self.backoff:  # fresh estimates while the batch moves, fewer once it has settled
            self.monitor_every = self._first_every if d.switched else min(2 * self.monitor_every,
                                                                          max(self._first_every, self.max_monitor_every))
            if d.switched:
                self._next_observed = step  # the next (0-based) step

    def _throughput(self):
        """Samples/s per batch, the candidates it is trusted at, and the step-time fit (if used)."""
        if self.throughput is None and self.throughput_mode == "probe":
            self.throughput = self._probe(self.candidates)
        if self.throughput is not None:
            return self.throughput, self.candidates, None
        fit = self.step_timer.fit()
        if fit is None:  # one size timed (an unsplit monitor): probe the neighbouring candidates once
            i = self.candidates.index(self.current)
            near = [b for b in self.candidates[max(0, i - 1):i + 2] if b != self.current or b not in self.step_timer.times]
            for b, sps in zip(near, self._probe(near).samples_per_s):
                self.step_timer.times.setdefault(b, []).append(b / sps)
            fit = self.step_timer.fit()
            if fit is None:
                return None, (), None
        trusted = tuple(c for c in self.candidates if c == self.current or fit.trusted(c))
        return fit.samples_per_s, trusted, fit

    def _probe(self, batches: Sequence[int]) -> ThroughputTable:
        """Time a few steps at ``batches`` on a copy of the model (:func:`measure_throughput`)."""
        if self._workload is None or self._model_fn is None:
            raise BatchpilotError("AdaptiveDriver.bind(model_fn, workload, dtype, family) must be called before training")
        t0 = time.perf_counter()
        active = getattr(self.monitor, "active", None)
        if active is not None:  # the probe's copy of the model carries copies of the hooks: idle them
            self.monitor.active = False
        table = measure_throughput(self._workload, self._model_fn(), batches,
                                   lambda b: micro_batch_for(b, self.micro_cap, 1), self._dtype)
        self.probe_s += time.perf_counter() - t0
        self.probed += list(batches)
        if active is not None:
            self.monitor.active = active
        return table

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(current=self.current, b_noise=self.b_noise, decisions=[dict(d) for d in self.decisions],
                     units=self._units, samples=self._samples, lr_mode=self.lr_mode,
                     monitor_every=self.monitor_every, next_observed=self._next_observed,
                     observed_steps=list(self.observed_steps),
                     throughput=None if self.throughput is None else
                     {"batches": list(self.throughput.batches), "samples_per_s": list(self.throughput.samples_per_s)},
                     monitor=self.monitor.state_dict(), step_times=self.step_timer.state_dict(),
                     probed=list(self.probed), probe_s=self.probe_s)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.current, self.b_noise = int(state["current"]), float(state["b_noise"])
        self.decisions = [dict(d) for d in state["decisions"]]
        self._units, self._samples, self.lr_mode = int(state["units"]), int(state["samples"]), state["lr_mode"]
        self.monitor_every = int(state.get("monitor_every", self.monitor_every))
        self._next_observed = int(state.get("next_observed", 0))
        self.observed_steps = [int(s) for s in state.get("observed_steps", [])]
        t = state["throughput"]
        self.throughput = None if t is None else ThroughputTable(tuple(int(b) for b in t["batches"]),
                                                                 tuple(float(s) for s in t["samples_per_s"]))
        if state.get("monitor") is not None:
            self.monitor.load_state_dict(state["monitor"])
        if state.get("step_times") is not None:
            self.step_timer.load_state_dict(state["step_times"])
        self.probed, self.probe_s = [int(b) for b in state.get("probed", [])], float(state.get("probe_s", 0.0))
