"""The planner's core: goodput over the feasible (micro-batch, accumulation) pairs. Pure functions.

Goodput (Qiao et al. 2021, "Pollux", OSDI, eq. 2-3) is throughput times statistical efficiency::

    goodput(B)    = samples_per_s(B) · efficiency(B)
    efficiency(B) = (B_noise + B0) / (B_noise + B)

where B0 is the batch the user tuned (the workload's base batch) and B_noise the gradient noise
scale (McCandlish et al. 2018). The efficiency is the ratio of samples needed to reach a given
loss at B0 to those needed at B: McCandlish et al.'s ``E(B) = E_min (1 + B/B_noise)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol, Sequence

from batchpilot.errors import BatchpilotError
from batchpilot.scaling.efficiency import efficiency  # noqa: F401 - re-exported (batchpilot.plan.efficiency)
from batchpilot.scaling.lr_rules import scale_lr

MAX_ACCUMULATION = 64
"""The largest accumulation the search considers."""


class StepTimeModel(Protocol):
    def step_s(self, micro_batch: int, accumulation_steps: int = 1) -> float: ...


class MemoryModel(Protocol):
    def peak_bytes(self, micro_batch: int) -> float: ...

    def max_micro_batch(self, budget_bytes: float) -> int: ...


def effective_noise_scale(points: Sequence[tuple[float, float]], base_batch: float) -> float:
    """One B_noise for a whole run whose noise scale changes: a weighted harmonic mean.

    With ``points = [(samples_seen, b_noise), ...]`` measured at ``base_batch``, the run splits into
    phases; phase p took ``n_p`` samples, so ``E_min,p = n_p / (1 + B0/B_p)`` (McCandlish et al. 2018,
    eq. 2.11). At batch B the run needs ``Σ E_min,p (1 + B/B_p) = E_min (1 + B/B_eff)`` samples, with
    ``B_eff = Σ E_min,p / Σ (E_min,p / B_p)``. Phases whose estimate is not a positive number are skipped.
    """
    e_total = weighted = 0.0
    prev = 0.0
    for samples, b in points:
        n = samples - prev
        prev = samples
        if n <= 0 or not (b > 0):
            continue
        e_min = n / (1 + base_batch / b) if math.isfinite(b) else n
        e_total += e_min
        weighted += e_min / b if math.isfinite(b) else 0.0
    if e_total == 0:
        return float("nan")
    return e_total / weighted if weighted > 0 else float("inf")


def warmup_steps_for(batch: int, base_batch: int, run_steps: int) -> int:
    """Linear-warmup length for a jump from ``base_batch`` to ``batch``.

    Goyal et al. (2017) warm up for 5 of 90 epochs (~6%) on a 32x jump and need none at 1x. The
    warmup here is ``1.2% x log2(B/B0)`` of the run (6% at 32x, capped at 20%), at least one step
    per doubling; none when the batch does not grow.
    """
    if batch <= base_batch:
        return 0
    doublings = math.log2(batch / base_batch)
    frac = min(0.2, 0.012 * doublings)
    return max(math.ceil(doublings), math.ceil(frac * max(1, run_steps)))


@dataclass(frozen=True)
class Candidate:
    """One feasible configuration and what the model predicts for it.

    Attributes:
        micro_batch_per_rank, accumulation_steps, world_size: the split of the global batch.
        global_batch: ``micro x accumulation x world``.
        step_s: predicted optimizer-step time.
        samples_per_s: predicted samples/s over all ranks.
        efficiency: Pollux statistical efficiency relative to the base batch.
        goodput: ``samples_per_s x efficiency``.
        peak_bytes: predicted peak memory per rank.
        lr: peak LR after the scaling rule.
        warmup_steps: warmup length.
        steps_to_target: predicted optimizer steps to the target (warmup included), or ``None``.
        time_to_target_s: predicted training seconds to the target, or ``None``.
    """

    micro_batch_per_rank: int
    accumulation_steps: int
    world_size: int
    global_batch: int
    step_s: float
    samples_per_s: float
    efficiency: float
    goodput: float
    peak_bytes: float
    lr: float
    warmup_steps: int
    steps_to_target: int | None
    time_to_target_s: float | None

    def __post_init__(self) -> None:
        if self.global_batch != self.micro_batch_per_rank * self.accumulation_steps * self.world_size:
            raise BatchpilotError("global_batch must equal micro_batch_per_rank x accumulation_steps x world_size")

    def to_dict(self) -> dict:
        """Plain data."""
        return asdict(self)


def evaluate(micro: int, accumulation: int, *, world_size: int, throughput: StepTimeModel, memory: MemoryModel,
             b_noise: float, base_batch: int, base_lr: float, lr_rule: str,
             anchor: tuple[int, float] | None, steps_per_epoch_base: int) -> Candidate:
    """Predict one (micro-batch, accumulation) configuration.

    ``anchor = (batch, samples_to_target)`` measured at ``batch``; samples to target at B follow
    ``E(B) = E(anchor) (B_noise + B) / (B_noise + anchor)``.
    """
    batch = micro * accumulation * world_size
    step_s = throughput.step_s(micro, accumulation)
    samples_per_s = batch / step_s
    eff = efficiency(batch, b_noise, base_batch)
    lr = scale_lr(base_lr, base_batch, batch, lr_rule)
    steps = time_s = None
    if anchor is not None:
        samples = anchor[1] * efficiency(anchor[0], b_noise, batch)  # E(B) = E(a) * (Bn + B)/(Bn + a)
        plain = max(1, math.ceil(samples / batch))
        # a run predicted far beyond what was measured must not get a warmup just as far: at most the
        # 5 epochs Goyal et al. (2017) warm up for
        warmup = min(warmup_steps_for(batch, base_batch, plain),
                     max(math.ceil(math.log2(max(batch / base_batch, 1))), 5 * steps_per_epoch_base * base_batch // batch))
        steps = plain + warmup // 2  # a linear warmup costs about half its length
        time_s = steps * step_s
    else:
        warmup = warmup_steps_for(batch, base_batch, max(1, steps_per_epoch_base * base_batch // batch))
    return Candidate(micro, accumulation, world_size, batch, step_s, samples_per_s, eff, samples_per_s * eff,
                     memory.peak_bytes(micro), lr, warmup, steps, time_s)


def search(*, micro_choices: Sequence[int], world_size: int, max_micro_batch: int, max_global_batch: int,
           max_accumulation: int = MAX_ACCUMULATION, **kwargs) -> list[Candidate]:
    """Every feasible pair: micro-batch from ``micro_choices`` that fits (``<= max_micro_batch``),
    accumulation a power of two up to ``max_accumulation``, global batch ``<= max_global_batch``.
    For each global batch one split is kept: no accumulation when the micro-batch fits, unless an
    accumulated split is predicted faster by more than the timing uncertainty (:func:`_faster_split`).
    Sorted by global batch.
    """
    best: dict[int, Candidate] = {}
    for micro in sorted(set(micro_choices)):
        if micro > max_micro_batch:
            continue
        accumulation = 1
        while accumulation <= max_accumulation and micro * accumulation * world_size <= max_global_batch:
            cand = evaluate(micro, accumulation, world_size=world_size, **kwargs)
            old = best.get(cand.global_batch)
            best[cand.global_batch] = cand if old is None else _faster_split(old, cand, kwargs.get("throughput"))
            accumulation *= 2
    if not best:
        raise BatchpilotError(f"no feasible configuration: the largest micro-batch that fits is {max_micro_batch}, "
                              f"the candidates were {sorted(set(micro_choices))}")
    return [best[b] for b in sorted(best)]


TIE_FLOOR = 0.02
"""Goodputs closer than 2% are a tie even when the timing looks certain: the efficiency model is not that exact."""
TIE_CAP = 0.10
"""...and a tie never spans more than 10%: on a very noisy machine the band is reported (and a caveat given), but
the choice does not drift to a batch predicted to be much slower."""


def log_uncertainty(throughput: object, micro_a: int, micro_b: int) -> float:
    """The timing uncertainty of ``log(step_s(a)/step_s(b))`` (0 for models that do not measure it)."""
    fn = getattr(throughput, "log_ratio_uncertainty", None)
    return float(fn(micro_a, micro_b)) if fn is not None else 0.0


def _faster_split(a: Candidate, b: Candidate, throughput: object) -> Candidate:
    """Of two splits of one global batch: accumulation only when it is *measurably* faster."""
    plain, acc = (a, b) if a.accumulation_steps <= b.accumulation_steps else (b, a)
    margin = log_uncertainty(throughput, plain.micro_batch_per_rank, acc.micro_batch_per_rank) + TIE_FLOOR
    if plain.accumulation_steps == 1 and acc.accumulation_steps > 1:
        return acc if math.log(plain.step_s / acc.step_s) > margin else plain
    return a if a.step_s <= b.step_s else b


def tie_margin(candidate: Candidate, best: Candidate, throughput: object = None) -> float:
    """How far (in log goodput) ``candidate`` may trail ``best`` and still be a tie."""
    u = log_uncertainty(throughput, candidate.micro_batch_per_rank, best.micro_batch_per_rank)
    return min(TIE_CAP, max(TIE_FLOOR, u))


def ties(candidates: Sequence[Candidate], throughput: object = None) -> list[Candidate]:
    """The candidates whose goodput is within the measured uncertainty of the best one's."""
    best = max(candidates, key=lambda c: c.goodput)
    return [c for c in candidates
            if c.goodput > 0 and math.log(best.goodput / c.goodput) <= tie_margin(c, best, throughput)]


def choose(candidates: Sequence[Candidate], throughput: object = None) -> Candidate:
    """The goodput-optimal candidate, stable under timing noise.

    Candidates whose goodput trails the best by less than the measured timing uncertainty of
    their step-time ratio (from the interleaved rounds of :func:`batchpilot.throughput.measure.measure_throughput`,
    at least :data:`TIE_FLOOR`, at most :data:`TIE_CAP`) are a tie; the tie goes to no accumulation, then to the larger batch
    (fewer optimizer steps for the same predicted time).
    """
    return max(ties(candidates, throughput), key=lambda c: (c.accumulation_steps == 1, c.global_batch))


def goodput_band(candidate: Candidate, chosen: Candidate, throughput: object = None) -> tuple[float, float]:
    """``(low, high)`` goodput of ``candidate`` from the timing uncertainty of its ratio to ``chosen``."""
    u = log_uncertainty(throughput, candidate.micro_batch_per_rank, chosen.micro_batch_per_rank)
    return candidate.goodput * math.exp(-u), candidate.goodput * math.exp(u)
