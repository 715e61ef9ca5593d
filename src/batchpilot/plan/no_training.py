"""The statistical side of a plan that does not train: a given noise scale, or none at all.

The planner measures the gradient noise scale B_noise (McCandlish et al. 2018, "An empirical model of
large-batch training") and checks the base LR by training the workload here. That is impossible for a
memory-only workload (``hf:gpt2`` at full size: random tokens, and 124M parameters would train for hours
on this CPU), and unnecessary when the user already knows B_noise. Then:

* ``--noise-scale N`` (**given**): goodput uses ``efficiency(B) = (N + B0) / (N + B)`` (Pollux, Qiao et al.
  2021) with the user's N, marked ``given`` in the plan, its text and its report;
* no noise scale (**not measured**): ``B_noise = inf``, so every efficiency is 1 and goodput is throughput:
  the choice rests on samples/s (or tokens/s) alone, and the plan says so.

The stages that need training (the LR check, the noise probe, the confirmation runs) are skipped and
:func:`skipped_stages` gives each one's reason for the plan's ``skipped`` field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchpilot.errors import BatchpilotError

GIVEN = "given"
NOT_MEASURED = "not_measured"


@dataclass(frozen=True)
class NoiseSource:
    """Where a plan that ran no noise probe gets B_noise.

    Attributes:
        b_noise: the given noise scale in samples, or ``None``: not measured (efficiency 1 everywhere).
        why: why no probe ran (shown in the note).
    """

    b_noise: float | None
    why: str

    def __post_init__(self) -> None:
        if self.b_noise is not None and (isinstance(self.b_noise, bool) or not isinstance(self.b_noise, (int, float))
                                         or not (self.b_noise > 0 and math.isfinite(self.b_noise))):
            raise BatchpilotError(f"the noise scale must be a positive finite number of samples, got {self.b_noise!r}")
        if not self.why.strip():
            raise BatchpilotError("a noise source needs a reason why no probe ran")

    @property
    def method(self) -> str:
        """``given`` or ``not_measured``."""
        return GIVEN if self.b_noise is not None else NOT_MEASURED

    @property
    def b_used(self) -> float:
        """The B_noise goodput uses: the given one, or ``inf`` (efficiency 1: goodput = throughput)."""
        return float(self.b_noise) if self.b_noise is not None else math.inf

    def noise_dict(self) -> dict:
        """Plain data for ``plan.noise``."""
        return {"method": self.method, "b_used": self.b_used, "b_given": self.b_noise, "confirmation": None,
                "loss_at_target": None, "loss_at_target_source": None, "trend": None, "why_not_measured": self.why}

    def note(self) -> str:
        """The plan's noise note."""
        if self.b_noise is not None:
            return (f"B_noise = {self.b_noise:,.0f} samples is GIVEN (--noise-scale), not measured: {self.why}. "
                    "Statistical efficiency (B_noise + B0)/(B_noise + B) (McCandlish et al. 2018; Pollux, Qiao et "
                    "al. 2021) and goodput use it as given.")
        return (f"The noise scale was NOT MEASURED: {self.why}. Statistical efficiency is taken as 1 at every batch, "
                "so goodput equals throughput and the choice rests on throughput alone; a batch beyond the critical "
                "batch would need more samples to the same loss, which this plan cannot see. Give --noise-scale N "
                "(samples) to plan with one.")


def plans_without_training(device: str | None, memory: str | int | None = None) -> bool:
    """Whether a memory-only workload can be planned for ``device``: its step time comes from a CUDA device that
    is here, or is predicted for a GPU of :mod:`batchpilot.throughput.predict`'s tables; never from this CPU."""
    import torch

    from batchpilot.memory import resolve_device
    from batchpilot.throughput.predict import gpu_model

    spec = resolve_device(device, memory)
    return spec.kind == "cuda" and (torch.cuda.is_available() or gpu_model(spec.name) is not None)


def skipped_stages(why: str, *, lr_check: bool, probe: bool) -> dict[str, str]:
    """The training stages a plan skipped and why (``plan.skipped``)."""
    out: dict[str, str] = {}
    if lr_check:
        out["lr_check"] = f"not run: {why}; the base LR is the workload's, unchecked"
    if probe:
        out["noise_probe"] = f"not run: {why}"
        out["confirm"] = "not run: it needs the noise probe's learning curve"
    return out


def caveats(source: NoiseSource, *, lr_checked: bool, memory_only: bool, batch_ratio: float = 1.0) -> list[str]:
    """What a reader must know about a plan without the statistical measurements (``batch_ratio``: the chosen
    global batch over the base batch)."""
    out = []
    if source.b_noise is None:
        out.append("Statistical efficiency was NOT MEASURED (no noise probe): goodput = throughput, and the choice "
                   "rests on throughput alone; past the (unknown) critical batch it needs more samples to the same "
                   "loss. Give --noise-scale N to plan with a noise scale.")
        if batch_ratio > 1:
            out.append(f"The chosen batch is {batch_ratio:,.3g}x the base batch and its LR is scaled by the rule over "
                       "that whole range with no critical batch to bound it: treat both as an upper end to sweep down "
                       "from, not a recipe.")
    else:
        out.append(f"The noise scale {source.b_noise:,.0f} is GIVEN (--noise-scale), not measured; "
                   "the alternatives best_if_noise_low/high show how the choice moves if it is off by 2x.")
    if not lr_checked:
        out.append("The base LR was not checked (no training here): the LR is the workload's base LR scaled by the "
                   "rule, unverified.")
    if memory_only:
        out.append("The workload is memory-only (random tokens): no steps or time to a target are predicted, the "
                   "warmup is the minimum (one step per doubling of the batch), and `batchpilot train --plan` refuses "
                   "it; train it with data=PATH on the GPU.")
    return out


__all__ = ["GIVEN", "NOT_MEASURED", "NoiseSource", "caveats", "plans_without_training", "skipped_stages"]
