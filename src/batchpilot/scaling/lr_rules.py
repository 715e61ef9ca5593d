"""Learning-rate scaling rules: how the LR moves when the global batch moves.

The rule depends on the optimizer (seeds/README.md, error 6):

* **linear** (Goyal et al. 2017, "Accurate, Large Minibatch SGD"): ``lr = base_lr * B / B0``.
  An empirical result for SGD; it holds up to about the critical batch size and
  fails beyond it (McCandlish et al. 2018; Shallue et al. 2019).
* **sqrt** (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
  Algorithms"): ``lr = base_lr * sqrt(B / B0)`` for Adam-family optimizers.
* **none**: keep the base LR.
"""

from __future__ import annotations

import math
from typing import Literal

from batchpilot.errors import BatchpilotError

LRRule = Literal["linear", "sqrt", "none"]
LR_RULES: tuple[str, ...] = ("linear", "sqrt", "none")

# Optimizer class names (lower case) whose default rule is square-root scaling.
ADAPTIVE_OPTIMIZERS = frozenset({"adam", "adamw", "adamax", "nadam", "radam", "adagrad", "rmsprop", "lamb", "adafactor"})


def default_lr_rule(optimizer_family: str) -> LRRule:
    """The default rule for an optimizer class name: ``sqrt`` for the Adam family, else ``linear``.

    LARS is SGD with layer-wise trust ratios and keeps linear scaling (You et al. 2017);
    LAMB is its Adam-based sibling and takes the Adam rule.
    """
    return "sqrt" if optimizer_family.lower() in ADAPTIVE_OPTIMIZERS else "linear"


def scale_lr(base_lr: float, base_batch: int, batch: int, rule: str) -> float:
    """Scale ``base_lr`` tuned at ``base_batch`` to ``batch`` by ``rule``.

    Args:
        base_lr: LR tuned at ``base_batch`` (> 0).
        base_batch: the batch the base LR was tuned at (>= 1).
        batch: the new global batch (>= 1).
        rule: ``linear`` (Goyal et al. 2017), ``sqrt`` (Malladi et al. 2022) or ``none``.

    Returns:
        The scaled LR.

    Raises:
        BatchpilotError: on an unknown rule or non-positive inputs.
    """
    if rule not in LR_RULES:
        raise BatchpilotError(f"lr rule must be one of {', '.join(LR_RULES)}, got {rule!r}")
    if not base_lr > 0:
        raise BatchpilotError(f"base lr must be > 0, got {base_lr!r}")
    for name, value in (("base batch", base_batch), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BatchpilotError(f"{name} must be a positive integer, got {value!r}")
    ratio = batch / base_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    return base_lr
