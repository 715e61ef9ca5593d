"""bench/claims/_curves.py: the claim checks' loop is batchpilot.train's step (bit for bit at a constant
batch and LR), and it applies a changing batch and LR as asked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from batchpilot import get_workload
from batchpilot.train import TrainConfig, train

CLAIMS = Path(__file__).resolve().parents[2] / "bench" / "claims"


@pytest.fixture(scope="module")
def curves():
    sys.path.insert(0, str(CLAIMS))
    try:
        import _curves

        yield _curves
    finally:
        sys.path.remove(str(CLAIMS))


def test_constant_batch_and_lr_match_the_trainer_bit_for_bit(curves):
    torch.set_num_threads(1)
    w = get_workload("mnist1d-mlp")
    ref = train(w, TrainConfig(global_batch=64, lr=0.1, steps=12, seed=3))
    c = curves.run_curve(w, batch=64, lr=0.1, samples=64 * 12, eval_at=[], seed=3)
    assert c.steps == 12 and c.samples == 768 and not c.diverged
    assert c.losses[-1] == ref.final_train_loss
    assert c.points[-1][2] == ref.val_loss and c.points[-1][3] == ref.val_metric
    # accumulation: the same losses up to float rounding
    acc = curves.run_curve(w, batch=64, lr=0.1, samples=64 * 12, eval_at=[], seed=3, micro_batch=16)
    assert acc.losses[-1] == pytest.approx(ref.final_train_loss, rel=1e-5)


def test_schedules_set_each_steps_batch_and_lr(curves):
    w = get_workload("mnist1d-mlp")
    seen_lrs = []

    def lr(samples):
        seen_lrs.append(0.01 if samples < 256 else 0.05)
        return seen_lrs[-1]

    c = curves.run_curve(w, batch=lambda s: 128 if s < 256 else 32, lr=lr, samples=320, eval_at=[100, 300])
    assert c.steps == 4 and c.samples == 320  # 128, 128, 32, 32
    assert seen_lrs == [0.01, 0.01, 0.01, 0.05, 0.05]  # lr(0) builds the optimizer, then one per step
    assert [p[0] for p in c.points] == [128, 320]  # after 128 (>= 100); after 320 (>= 300, and the end: one eval)
    assert c.samples_to("val_loss", "<=", 1e9) == 128 and c.samples_to("val_metric", ">=", 2.0) is None
    assert c.steps_to("val_loss", "<=", 1e9) == 1
    early = curves.run_curve(w, batch=64, lr=0.05, samples=64 * 40, eval_at=range(64, 64 * 40, 64),
                             stop_at=("val_loss", "<=", 1e9))
    assert early.steps == 1 and len(early.points) == 1


def test_divergence_stops_the_run(curves):
    w = get_workload("mnist1d-mlp")
    c = curves.run_curve(w, batch=64, lr=1e4, samples=64 * 50, eval_at=[])
    assert c.diverged and c.steps < 50


def test_a_controller_reads_the_model_and_sets_batch_and_lr(curves):
    """``controller`` (bench/claims/snr_schedule.py) replaces batch and LR; a constant one is the plain run."""
    torch.set_num_threads(1)
    w = get_workload("mnist1d-mlp")
    calls = []

    def ctl(model, samples, steps):
        calls.append((samples, steps, isinstance(model, torch.nn.Module)))
        return 64, 0.1

    plain = curves.run_curve(w, batch=64, lr=0.1, samples=64 * 5, eval_at=[], seed=3)
    c = curves.run_curve(w, batch=1, lr=9.0, samples=64 * 5, eval_at=[], seed=3, controller=ctl)
    assert c.losses == plain.losses
    assert calls == [(64 * i, i, True) for i in range(5)]
