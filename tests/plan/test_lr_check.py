"""The base-LR check: decision rule, and a real check that finds a base LR set far too low."""

import dataclasses
import math

import pytest

from batchpilot import BatchpilotError, get_workload
from batchpilot.plan.lr_check import check_base_lr, decide, with_checked_lr


def test_decide_keeps_the_base_lr_within_tolerance():
    assert decide((0.5, 1.0, 2.0), (1.0, 0.99, 0.97)) == 1.0  # 2x is only 2% better
    assert decide((0.5, 1.0, 2.0, 4.0), (1.2, 1.0, 0.7, 0.69)) == 2.0  # smallest within 5% of the best
    assert decide((0.5, 1.0, 2.0), (0.5, math.inf, math.inf)) == 0.5  # base diverged
    with pytest.raises(BatchpilotError):
        decide((0.5, 2.0), (1.0, 1.0))
    with pytest.raises(BatchpilotError):
        decide((1.0, 2.0), (math.inf, math.inf))


def test_check_finds_a_base_lr_far_too_low_and_leaves_the_workload_alone():
    w = get_workload("mnist1d-mlp", num_train=1000, num_val=200)
    slow = dataclasses.replace(w, base_lr=w.base_lr / 100)
    check = check_base_lr(slow, steps=60, multipliers=(1.0, 10.0, 100.0), seed=0)
    assert check.chosen_multiplier > 1.0
    assert check.late_losses[check.multipliers.index(check.chosen_multiplier)] < check.late_losses[0]
    fixed = with_checked_lr(slow, check)
    assert fixed.base_lr == pytest.approx(slow.base_lr * check.chosen_multiplier)
    assert slow.base_lr == w.base_lr / 100  # the original is untouched
    assert "off" in check.note
