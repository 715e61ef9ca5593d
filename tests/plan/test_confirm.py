"""B_crit fitted from samples to a common loss: E(B) = E_min (1 + B / B_crit) (McCandlish et al. 2018)."""

import math

import pytest

from batchpilot import get_workload
from batchpilot.plan.confirm import confirm_critical_batch, fit_critical_batch


@pytest.mark.parametrize("b_crit", [20.0, 300.0, 5000.0])
def test_fit_recovers_the_critical_batch(b_crit):
    batches = [32, 128, 512]
    samples = [1000 * (1 + b / b_crit) for b in batches]
    got, e_min = fit_critical_batch(batches, samples)
    assert got == pytest.approx(b_crit, rel=0.03)
    assert e_min == pytest.approx(1000, rel=0.03)


def test_fit_edge_cases():
    assert fit_critical_batch([32, 128], [1000, 1000])[0] == math.inf  # perfect scaling
    assert math.isnan(fit_critical_batch([32], [1000])[0])
    assert math.isnan(fit_critical_batch([32, 128], [1000, None])[0])
    # one batch far past the rest does not decide the fit alone (log errors)
    got, _ = fit_critical_batch([32, 128, 512], [8000, 14304, 75584])
    assert 10 < got < 100


def test_confirmation_runs_train_larger_batches_to_the_loss():
    w = get_workload("mnist1d-mlp", num_train=1000, num_val=200)
    conf = confirm_critical_batch(w, base_samples=2000, loss_threshold=10.0, batches=[64, 128],
                                  lr_for=lambda b: w.base_lr * b / w.base_batch, warmup_for=lambda b: 0,
                                  micro_for=lambda b: None, seed=0)
    assert conf.batches == (32, 64, 128)
    assert all(s is not None and s <= 2 * 128 for s in conf.samples[1:])  # a loss of 10 is met at once
