"""The plan: the goodput-optimal batch, LR, warmup and accumulation from measurements.

``make_plan`` runs memory -> throughput -> noise probe -> goodput search (:mod:`.build`);
the pure core is in :mod:`.goodput`; the result is a :class:`Plan` (:mod:`.result`).
"""

from batchpilot.plan.build import has_batchnorm, make_plan
from batchpilot.plan.goodput import Candidate, effective_noise_scale, efficiency, warmup_steps_for
from batchpilot.plan.probe import NoiseProbe, probe_noise
from batchpilot.plan.result import Plan, read_plan, write_plan

__all__ = ["Candidate", "NoiseProbe", "Plan", "effective_noise_scale", "efficiency", "has_batchnorm", "make_plan",
           "probe_noise", "read_plan", "warmup_steps_for", "write_plan"]
