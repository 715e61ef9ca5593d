"""The noise scale a plan measures: the probe's B_simple trend read at the target's loss, then B_crit from short
confirmation runs at larger batches (McCandlish et al. 2018, "An empirical model of large-batch training"; Kaplan
et al. 2020 for the trend against the loss). :func:`batchpilot.plan.build.make_plan` calls these in turn.
"""

from __future__ import annotations

import math

from batchpilot.plan import goodput as gp
from batchpilot.plan.confirm import Confirmation, confirm_critical_batch
from batchpilot.plan.noise_trend import fit_noise_trend, loss_at_target
from batchpilot.plan.probe import NoiseProbe
from batchpilot.workloads import Workload


def noise_from_probe(probe: NoiseProbe, workload: Workload) -> dict:
    """The noise scale the plan uses, from the probe: its trend against the loss, read at the target.

    Falls back to the probe's effective (phase-weighted harmonic mean) B_simple when there is no
    trend to fit. Returns plain data for ``plan.noise``.
    """
    trend = fit_noise_trend(probe.loss_phases)
    evals = [(p.val_loss, p.metric) for p in probe.points if p.val_loss is not None and p.metric is not None]
    target_loss = loss_at_target(evals, workload.target)
    out: dict = {"b_simple_effective": probe.b_noise_effective, "b_simple_last": probe.b_noise_last,
                 "trend": trend.to_dict() if trend else None, "loss_at_target": target_loss.loss,
                 "loss_at_target_source": target_loss.source, "loss_extrapolation": target_loss.extrapolation,
                 "confirmation": None}
    if trend is not None and len(trend.points) >= 2 and math.isfinite(target_loss.loss):
        out["b_trend_at_target"] = trend.at(target_loss.loss)
        out["method"] = "trend_vs_loss"
        out["b_used"] = out["b_trend_at_target"]
    elif probe.b_noise_effective > 0:
        out["method"] = "probe_effective"
        out["b_used"] = probe.b_noise_effective
    else:  # no usable estimate: plan as if the base batch were critical
        out["method"] = "base_batch_fallback"
        out["b_used"] = float(workload.base_batch)
    return out


def confirm(workload, probe: NoiseProbe, noise: dict, common: dict, *, max_micro: int, world_size: int, seed: int,
             budget_s: float, progress) -> dict:
    """Short runs at 4x and 16x the base batch to the loss the probe had reached halfway; the fitted B_crit
    replaces the noise scale. (Carrying it to the target's loss along the B_simple trend was worse on the
    bench: 6.5x too high on a character GRU, 2.8x on a GroupNorm CNN, against 0.7-2.2x without.)

    Halfway, not at the probe's best loss: a probe that ran to its target may end near the lowest loss the
    data allows, which large batches reach late or never (on the bench's digits workload a batch of 512
    did not reach it within 16x the samples); the trend carries the correction to the target's loss."""
    losses = [(p.samples, p.val_loss) for p in probe.points if p.val_loss]
    if not losses:
        return noise
    half = max(losses[-1][0] / 2, losses[0][0])
    threshold = min(l for s, l in losses if s <= half) * 1.02  # with a 2% margin against eval noise
    base_samples = next(s for s, l in losses if l <= threshold)
    b0 = workload.base_batch
    cap = workload.num_train // 4
    batches = [b for b in (4 * b0, 16 * b0) if b <= cap * world_size] or [min(2 * b0, workload.num_train)]
    if progress:
        progress(f"confirm: batches {batches} to loss {threshold:.3g}", 0.0)

    def micro_for(b: int) -> int | None:
        per_rank = b // world_size
        return None if per_rank <= max_micro else max(m for m in range(1, max_micro + 1) if per_rank % m == 0)

    def warmup_for(b: int) -> int:
        return gp.warmup_steps_for(b, b0, max(1, math.ceil(base_samples / b)))

    def lr_for(b: int) -> float:
        return gp.scale_lr(workload.base_lr, b0, b, common["lr_rule"])

    conf: Confirmation = confirm_critical_batch(workload, base_samples=base_samples, loss_threshold=threshold,
                                                batches=batches, lr_for=lr_for, warmup_for=warmup_for,
                                                micro_for=micro_for, seed=seed, time_budget_s=budget_s)
    out = {**noise, "confirmation": conf.to_dict()}
    if math.isnan(conf.b_crit) or not conf.b_crit > 0:  # fewer than two batches reached L*: keep the trend
        return out
    trend = fit_noise_trend(probe.loss_phases)
    at_threshold = trend.at(threshold) if trend is not None else noise["b_used"]
    # what the trend would add between L* and the target: reported, not applied (see docs/planning.md)
    out["trend_factor_to_target"] = noise["b_used"] / at_threshold if at_threshold > 0 else 1.0
    if math.isinf(conf.b_crit):  # the samples did not grow up to the largest batch tried: B_crit is beyond it
        out["b_used"] = max(noise["b_used"], float(max(conf.batches)))
    else:
        out["b_used"] = conf.b_crit
    out["confirm_factor"] = out["b_used"] / noise["b_used"]
    out["method"] = noise.get("method", "probe_effective") + "+confirmed"
    return out


__all__ = ["confirm", "noise_from_probe"]
