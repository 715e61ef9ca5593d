"""Stratified batches: fixed per-class quotas, rare classes in every batch, and a measured drop in
gradient variance against uniform random batches on an imbalanced dataset."""

import pytest
import torch

from batchpilot import BatchpilotError
from batchpilot.workloads.data import EpochBatchSampler
from batchpilot.train.samplers import StratifiedBatchSampler, proportional_quotas


def _imbalanced(n=3000, seed=0):
    """Three classes at 90% / 8% / 2% with shifted Gaussian features."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((int(n * f),), c) for c, f in enumerate((0.90, 0.08, 0.02))])
    centers = torch.tensor([[0.0, 0.0], [2.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
    x = centers[y] + torch.randn(len(y), 2, generator=g, dtype=torch.float64)
    return x, y


def _per_sample_grads(x, y):
    """Per-sample gradients of the cross-entropy of a fixed (untrained) softmax regression, flattened."""
    w = torch.tensor([[0.3, -0.2, 0.1], [0.1, 0.4, -0.3]], dtype=torch.float64)
    p = torch.softmax(x @ w, dim=1)
    err = p - torch.nn.functional.one_hot(y, 3).double()  # dL/dlogits
    return (x[:, :, None] * err[:, None, :]).flatten(1)  # dL/dW per sample


def test_quotas_are_proportional_with_a_floor():
    assert proportional_quotas([900, 80, 20], 50) == [45, 4, 1]
    assert proportional_quotas([990, 9, 1], 20) == [18, 1, 1]
    q = proportional_quotas([500, 300, 200, 7], 33, min_per_class=2)
    assert sum(q) == 33 and min(q) >= 2
    with pytest.raises(BatchpilotError, match="cannot hold"):
        proportional_quotas([5, 5, 5], 2)


def test_every_batch_holds_every_class():
    x, y = _imbalanced()
    s = StratifiedBatchSampler(y, 32, seed=1)
    assert s.quotas == [29, 2, 1]
    for idx in s:
        assert len(idx) == 32
        assert torch.bincount(y[idx], minlength=3).tolist() == s.quotas
    # uniform random batches of 32 miss the 2% class about (0.98)^32 = 52% of the time: measured, not assumed
    r = EpochBatchSampler(len(y), seed=1)
    missing = sum(int((y[r.next_batch(32)] == 2).sum() == 0) for _ in range(90))
    assert missing > 20


def test_each_class_is_drawn_without_replacement_within_its_pass():
    x, y = _imbalanced()
    s = StratifiedBatchSampler(y, 50, seed=3)
    rare = [idx[y[idx] == 2] for idx in (s.next_batch() for _ in range(60))]
    first_pass = torch.cat(rare)[: int((y == 2).sum())]
    assert len(set(first_pass.tolist())) == len(first_pass)  # each rare sample once before any repeats


def test_stratified_gradient_has_lower_variance_than_random_batches():
    x, y = _imbalanced()
    grads = _per_sample_grads(x, y)
    full = grads.mean(0)
    batch, trials = 50, 400
    strat = StratifiedBatchSampler(y, batch, seed=0)
    rand = EpochBatchSampler(len(y), seed=0)
    est_s, est_r = [], []
    for _ in range(trials):
        idx = strat.next_batch()
        w = strat.weights(y[idx]).double()
        est_s.append((w[:, None] * grads[idx]).mean(0))
        est_r.append(grads[rand.next_batch(batch)].mean(0))
    est_s, est_r = torch.stack(est_s), torch.stack(est_r)
    mse_s = float(((est_s - full) ** 2).sum(1).mean())
    mse_r = float(((est_r - full) ** 2).sum(1).mean())
    # the stratified estimator is unbiased: its mean is within a few standard errors of the full gradient
    se = (est_s.var(0) / trials).sqrt()
    assert bool(((est_s.mean(0) - full).abs() < 4 * se + 1e-12).all())
    assert mse_s < 0.9 * mse_r, (mse_s, mse_r)  # measured ~0.75 at B=16..128


def test_weights_make_a_lifted_class_unbiased():
    y = torch.tensor([0] * 99 + [1])
    s = StratifiedBatchSampler(y, 10)
    assert s.quotas == [9, 1]
    w = s.weights(torch.tensor([0, 1]))
    assert float(w[0]) == pytest.approx((99 / 100) / (9 / 10))
    assert float(w[1]) == pytest.approx((1 / 100) / (1 / 10))


def test_state_dict_resumes_the_same_batches():
    x, y = _imbalanced()
    a = StratifiedBatchSampler(y, 40, seed=5)
    for _ in range(37):
        a.next_batch()
    b = StratifiedBatchSampler(y, 40, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(20):
        assert torch.equal(a.next_batch(), b.next_batch())
    with pytest.raises(BatchpilotError, match="quotas"):
        StratifiedBatchSampler(y, 41, seed=5).load_state_dict(a.state_dict())


def test_bad_input():
    with pytest.raises(BatchpilotError, match="batch size"):
        StratifiedBatchSampler(torch.tensor([0, 1, 1]), 5)
    with pytest.raises(BatchpilotError, match="quotas"):
        StratifiedBatchSampler(torch.tensor([0, 1, 1, 1]), 2, quotas=[1, 2])
