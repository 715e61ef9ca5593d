"""The plan's words, computed from its numbers: caveats, the LR-rule note, the noise note, "why this batch"."""

from __future__ import annotations

import math
from typing import Sequence

from batchpilot.plan.goodput import Candidate
from batchpilot.plan.probe import NoiseProbe
from batchpilot.throughput.measure import ThroughputCurve
from batchpilot.workloads import Workload

BN_SMALL_BATCH = 16
"""Per-device batch below which BatchNorm statistics get noisy (Wu & He 2018, "Group Normalization", Fig. 1)."""


def _fmt(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "unbounded" if x == math.inf else "n/a"
    return f"{x:,.0f}" if abs(x) >= 10 else f"{x:.3g}"


def lr_rule_note(rule: str, b_noise: float, batch: int, *, given: bool = False) -> str:
    """Where the LR rule comes from and where it stops holding (``given``: B_noise came from ``--noise-scale``)."""
    crit = (f"the critical batch given with --noise-scale (B_noise ≈ {_fmt(b_noise)} samples, not measured)" if given
            else f"the measured critical batch (B_noise ≈ {_fmt(b_noise)} samples)")
    if rule == "linear":
        head = "Linear scaling (Goyal et al. 2017), an empirical rule for SGD"
    elif rule == "sqrt":
        head = "Square-root scaling (Malladi et al. 2022), the SDE-matching rule for Adam-type optimizers"
    else:
        head = "No scaling: the base LR is kept"
    tail = (f"It holds while the batch is below about {crit}; beyond it larger batches stop cutting the steps "
            "proportionally (McCandlish et al. 2018; Shallue et al. 2019) and the scaled LR is an extrapolation "
            "that a sweep must confirm.")
    if math.isinf(b_noise):  # a plan that measured no noise scale (plan/no_training.py)
        return (f"{head}. It holds while the batch is below the critical batch (McCandlish et al. 2018; Shallue et "
                "al. 2019), which this plan did not measure: the scaled LR is unbounded by it and a sweep must "
                "confirm it.")
    where = "The chosen batch is beyond it." if math.isfinite(b_noise) and batch > b_noise else (
        "The chosen batch is within it.")
    return f"{head}. {tail} {where}"


def noise_note(probe: NoiseProbe, noise: dict | None = None) -> str:
    """Which B_noise value the plan uses, and how it was obtained (``noise`` is ``plan.noise``)."""
    pts = [p.b_noise for p in probe.points if p.b_noise > 0 and math.isfinite(p.b_noise)]
    span = f"from {_fmt(min(pts))} to {_fmt(max(pts))}" if pts else "without a usable value"
    ended = {"target_reached": "reached the target", "budget": "hit its time budget",
             "completed": "ran out of epochs"}[probe.status]
    head = (f"B_simple was measured during a {probe.steps}-step run at the base batch {probe.batch} (micro-batch "
            f"{probe.micro_batch}), which {ended}; the smoothed estimate ranged {span} samples (phase-weighted "
            f"harmonic mean {_fmt(probe.b_noise_effective)}).")
    noise = noise or {}
    method = noise.get("method", "probe_effective")
    if method.startswith("trend_vs_loss"):
        trend = noise.get("trend") or {}
        source = {"reached": "measured when the probe met the target",
                  "target_is_loss": "the target itself",
                  "extrapolated": f"extrapolated {noise.get('loss_extrapolation', 1):.1f}x below the probe's last "
                                  "loss from the metric's trend against log loss",
                  "last": "the probe's last loss (no trend toward the target yet)"}.get(
            noise.get("loss_at_target_source", ""), "")
        body = (f" The noise scale grows as the loss falls (McCandlish et al. 2018; Kaplan et al. 2020 fit B_crit as "
                f"a power law in the loss): a fit over {len(trend.get('points', ()))} phases gives "
                f"B ∝ L^{trend.get('slope', 0):.2f}, which at the target's validation loss "
                f"{_fmt(noise.get('loss_at_target'))} ({source}) is {_fmt(noise.get('b_trend_at_target'))}.")
    elif method.startswith("probe_effective"):
        body = " There were too few phases for a trend against the loss: the plan uses the harmonic mean."
    else:
        body = " There was no usable estimate: the plan treats the base batch as the critical batch."
    conf = noise.get("confirmation")
    if conf and method.endswith("+confirmed"):
        body += (f" Short runs at batches {', '.join(str(b) for b in conf['batches'])} to validation loss "
                 f"{conf['loss_threshold']:.3g} (the probe's loss halfway) fit B_crit = {_fmt(conf['b_crit'])} "
                 f"(E(B) = E_min(1 + B/B_crit), McCandlish et al. 2018); the plan uses it instead of B_simple, "
                 f"which tracked the sweeps' B_crit less well (docs/planning.md).")
    return f"{head}{body} The plan uses B_noise = {_fmt(noise.get('b_used', probe.b_noise_effective))} samples."


def rate_text(samples_per_s: float, tokens_per_sample: int | None) -> str:
    """``"1,234 samples/s"``, with the tokens/s when the loss unit is the token."""
    out = f"{_fmt(samples_per_s)} samples/s"
    return out + (f" ({_fmt(samples_per_s * tokens_per_sample)} tokens/s)" if tokens_per_sample else "")


def why_text(chosen: Candidate, base: Candidate | None, largest: Candidate, throughput: ThroughputCurve,
             b_noise: float, workload: Workload, *, tokens_per_sample: int | None = None) -> str:
    """One paragraph: why this batch, with the numbers (tokens/s too where the loss unit is the token)."""
    split = (f"micro-batch {chosen.micro_batch_per_rank} x {chosen.accumulation_steps} accumulation"
             f" x {chosen.world_size} rank{'s' if chosen.world_size > 1 else ''}")
    predicted = " PREDICTED" if str(throughput.peak_source).startswith("predicted") else ""
    if math.isinf(b_noise):
        parts = [f"Batch {chosen.global_batch} ({split}) has the highest{predicted} throughput, "
                 f"{rate_text(chosen.samples_per_s, tokens_per_sample)}. The noise scale was not measured, so "
                 "statistical efficiency is taken as 1 and goodput is throughput: the choice rests on throughput alone."]
    else:
        parts = [f"Batch {chosen.global_batch} ({split}) has the highest{predicted} goodput, {_fmt(chosen.goodput)} useful "
                 f"samples/s: it runs {rate_text(chosen.samples_per_s, tokens_per_sample)} at a statistical efficiency "
                 f"of {chosen.efficiency:.2f} (B_noise ≈ {_fmt(b_noise)} samples, so it needs "
                 f"{1 / chosen.efficiency:.2f}x the samples of the base batch {workload.base_batch} to reach the same "
                 "loss)."]
    if math.isinf(b_noise):
        if largest.global_batch != chosen.global_batch:
            parts.append(f"The largest batch that fits, {largest.global_batch}, runs "
                         f"{rate_text(largest.samples_per_s, tokens_per_sample)} (goodputs within the timing band tie; a tie "
                         "goes to no accumulation, then to the larger batch).")
        return " ".join(parts)
    if base is not None and base.global_batch != chosen.global_batch:
        parts.append(f"The base batch {base.global_batch} runs {_fmt(base.samples_per_s)} samples/s at efficiency "
                     f"1.00: goodput {_fmt(base.goodput)}, {chosen.goodput / base.goodput:.2f}x less than the choice.")
    if largest.global_batch != chosen.global_batch:
        parts.append(f"The largest batch that fits, {largest.global_batch}, runs {_fmt(largest.samples_per_s)} "
                     f"samples/s but its efficiency is only {largest.efficiency:.2f}: goodput {_fmt(largest.goodput)}, "
                     f"{chosen.goodput / largest.goodput:.2f}x less.")
    parts.append(f"Past the choice, samples/s grows more slowly than efficiency falls (the fitted step time saturates "
                 f"near batch {_fmt(throughput.saturation_batch)}, where the fixed {throughput.overhead_s * 1e3:.2g} ms "
                 f"per step is a tenth of it).")
    if chosen.time_to_target_s is not None:
        parts.append(f"Predicted: {chosen.steps_to_target} steps and {chosen.time_to_target_s:.1f} s of training to "
                     f"{workload.target}" + (f", against {base.time_to_target_s:.1f} s at the base batch."
                                             if base is not None and base.time_to_target_s else "."))
    return " ".join(parts)


def caveats_for(*, workload: Workload, chosen: Candidate, probe: NoiseProbe | None, throughput: ThroughputCurve, curve,
                batchnorm: bool, measured_on: str, spec, candidates: Sequence[Candidate], world_size: int,
                b_noise_used: float, comm_note: str | None = None, num_train: int | None = -1,
                noise_given: bool = False) -> list[str]:
    """Everything a reader should know before trusting the plan.

    ``probe`` is ``None`` when no noise probe ran (:mod:`.no_training` adds its own caveats); ``num_train`` is the
    training set's size (``-1``: the workload's; ``None``: unknown, a memory-only workload's random tokens)."""
    out: list[str] = []
    if batchnorm and chosen.accumulation_steps > 1:
        out.append(f"BatchNorm under accumulation: each of the {chosen.accumulation_steps} micro-batches normalises "
                   f"with its own {chosen.micro_batch_per_rank}-sample statistics, not the {chosen.global_batch}-sample "
                   "batch; consider GroupNorm/LayerNorm or a larger micro-batch.")
    if batchnorm and chosen.micro_batch_per_rank < BN_SMALL_BATCH:
        out.append(f"BatchNorm with a small per-device batch ({chosen.micro_batch_per_rank} < {BN_SMALL_BATCH}): its "
                   "statistics are noisy, which raised ImageNet ResNets' error (Wu & He 2018) but not every model's "
                   "(docs/claims.md #27); compare with SyncBatchNorm or GroupNorm in a sweep.")
    if math.isfinite(b_noise_used) and chosen.global_batch > b_noise_used:
        out.append(f"LR beyond the {'given' if noise_given else 'measured'} critical batch: batch {chosen.global_batch} > B_noise ≈ "
                   f"{_fmt(b_noise_used)}, so the scaled LR {chosen.lr:.3g} is an extrapolation of the rule; confirm "
                   "with `batchpilot sweep`.")
    if probe is None:
        pass
    elif not probe.b_noise_effective > 0:
        out.append("The noise probe gave no usable B_noise; the plan assumed B_noise = the base batch.")
    elif probe.b_noise_high > 3 * probe.b_noise_low or not math.isfinite(probe.b_noise_high):
        out.append(f"The noise scale is uncertain (80% interval {_fmt(probe.b_noise_low)}–{_fmt(probe.b_noise_high)}); "
                   "the alternatives 'best_if_noise_low/high' show how the choice moves if it is off by 2x.")
    if workload.target is None and probe is not None:  # (a probe that stopped short of a target: the planner's extrapolation caveat)
        out.append("The workload has no target; steps and time to a target are not predicted.")
    if chosen.global_batch == max(c.global_batch for c in candidates):
        out.append(f"The choice is the largest batch searched ({chosen.global_batch}): goodput may keep rising past "
                   "the dataset or memory limit.")
    n = workload.num_train if num_train == -1 else num_train
    if n is not None and chosen.global_batch > n // 8:
        out.append(f"Batch {chosen.global_batch} gives only {n // chosen.global_batch} steps per "
                   f"epoch over {n} samples.")
    spread = max((p.step_s_spread for p in throughput.points), default=0.0)
    if spread > 0.5:
        out.append(f"Step times were noisy (spread up to {spread:.0%} of the median; a busy machine?): samples/s "
                   "and the choice may move between runs.")
    if throughput.truncated_at is not None:
        out.append(f"Throughput was measured only up to batch {throughput.batches[-1]} (time budget); larger ones "
                   "are extrapolated from the fitted line.")
    if spec.kind == "cuda" and measured_on == "cpu":
        out.append(f"Memory is planned for {spec.name}, but throughput was measured on this CPU: samples/s, "
                   "goodput and wall times are this machine's, not the GPU's.")
    if world_size > 1 and comm_note:
        out.append(f"world size {world_size}: each step adds a ring all-reduce of the gradient ({comm_note}), "
                   "counted without overlap with the backward, so the step time is an upper bound.")
    elif world_size > 1:
        out.append(f"world size {world_size}: samples/s is the per-rank figure times {world_size}; gradient "
                   "all-reduce time is not measured.")
    traced = getattr(curve, "peak_bytes_at", None) or {}
    if traced:  # how far the fitted M(B) is from the trace nearest the chosen micro-batch
        b = min(traced, key=lambda k: abs(math.log(k / chosen.micro_batch_per_rank)))
        off = abs(curve.peak_bytes(b) - traced[b]) / traced[b] if traced[b] > 0 else 0.0
        if off > 0.1:
            out.append(f"The fitted M(B) is {off:.0%} off the traced peak at micro-batch {b}; peak_bytes near the "
                       "chosen micro-batch is approximate.")
    return out
