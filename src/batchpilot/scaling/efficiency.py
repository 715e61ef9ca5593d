"""Statistical efficiency of a batch relative to a base batch: the one formula the planner's goodput
(:mod:`batchpilot.plan.goodput`) and the adaptive controller (:mod:`batchpilot.train.adaptive`) share.

McCandlish et al. (2018, "An Empirical Model of Large-Batch Training") in the form Pollux (Qiao et al.
2021, OSDI) uses: one step at batch ``B`` makes the progress of ``(B/B0) · E(B)`` steps at ``B0``, with
``E(B) = (B_noise + B0) / (B_noise + B)``.
"""

from __future__ import annotations

import math

from batchpilot.errors import BatchpilotError


def efficiency(batch: float, b_noise: float, base_batch: float) -> float:
    """Statistical efficiency ``E(B) = (B_noise + B0) / (B_noise + B)`` of ``batch`` relative to ``base_batch``.

    Args:
        batch: the batch ``B`` (> 0).
        b_noise: the gradient noise scale, in the batches' units (>= 0); ``inf`` (the gradient is pure
            noise to the estimator) gives 1 for every batch.
        base_batch: ``B0`` (> 0), where ``E = 1``.

    Raises:
        BatchpilotError: a batch <= 0, or a noise scale that is negative or not a number.
    """
    if batch <= 0 or base_batch <= 0:
        raise BatchpilotError(f"batches must be positive, got {batch} and {base_batch}")
    if not b_noise >= 0:
        raise BatchpilotError(f"the noise scale must be >= 0, got {b_noise}")
    if math.isinf(b_noise):
        return 1.0
    return (b_noise + base_batch) / (b_noise + batch)
