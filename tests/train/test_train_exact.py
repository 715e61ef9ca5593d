"""Accumulation is exact without batch-coupled layers, and measurably not with BatchNorm."""

import pytest
import torch

from batchpilot import get_workload
from batchpilot.train import TrainConfig, Trainer, accumulate_gradients


def _train(workload, **kw):
    trainer = Trainer(workload, TrainConfig(**kw))
    result = trainer.run()
    return result, trainer.model


def _max_rel_diff(m1, m2):
    with torch.no_grad():
        return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(m1.parameters(), m2.parameters()))


def test_accumulation_equals_large_batch_fp64(mlp_workload):
    # 600 samples, batch 96: the 7th batch of each epoch is ragged (24 samples).
    common = dict(global_batch=96, steps=14, seed=0, dtype="float64", schedule="cosine", warmup_steps=3, grad_clip=1.0)
    r_full, m_full = _train(mlp_workload, **common)
    r_acc, m_acc = _train(mlp_workload, micro_batch_per_rank=16, **common)
    assert r_acc.accumulation_steps == 6 and r_full.accumulation_steps == 1
    assert _max_rel_diff(m_acc, m_full) < 1e-6
    assert abs(r_acc.final_train_loss - r_full.final_train_loss) / r_full.final_train_loss < 1e-9


def test_ragged_micro_batch_weighted_by_true_count(mlp_workload):
    torch.manual_seed(0)
    model = mlp_workload.make_model().double()
    x, y = mlp_workload.train_data[:50]
    x = x.double()
    loss_full = accumulate_gradients(model, [(x, y)], mlp_workload.loss_sum, mlp_workload.count_units)
    g_full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # micro-batches 16, 16, 16, 2: the last is ragged; plain averaging of micro losses would overweight it
    parts = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 50, 16)]
    loss_acc = accumulate_gradients(model, parts, mlp_workload.loss_sum, mlp_workload.count_units)
    assert loss_acc == pytest.approx(loss_full, rel=1e-12)
    for g, p in zip(g_full, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_token_normalisation_with_ignored_tokens():
    w = get_workload("charlm", seq_len=16)
    torch.manual_seed(0)
    model = w.make_model().double()
    x, y = w.train_data[:6]
    y = y.clone()
    y[0, :10] = -100  # variable token counts per micro-batch
    loss_full = accumulate_gradients(model, [(x, y)], w.loss_sum, w.count_units)
    g_full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_acc = accumulate_gradients(model, [(x[:2], y[:2]), (x[2:], y[2:])], w.loss_sum, w.count_units)
    assert loss_acc == pytest.approx(loss_full, rel=1e-10)
    for g, p in zip(g_full, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-10)


def test_batchnorm_accumulation_is_not_equivalent():
    w = get_workload("digits-cnn-bn")
    common = dict(global_batch=64, steps=5, seed=0, dtype="float64")
    _, m_full = _train(w, **common)
    _, m_acc = _train(w, micro_batch_per_rank=8, **common)
    # BN normalises each micro-batch with its own statistics: the weights drift apart far beyond rounding.
    assert _max_rel_diff(m_acc, m_full) > 1e-4


def test_scheduler_and_ema_step_per_optimizer_step(mlp_workload, tmp_path):
    cfg = TrainConfig(global_batch=64, micro_batch_per_rank=16, steps=6, warmup_steps=4, ema_decay=0.9, seed=0)
    trainer = Trainer(mlp_workload, cfg, out_dir=tmp_path)
    trainer.run()
    import json

    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    base = trainer.lr
    assert lrs == pytest.approx([base * f for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)])
    assert int(trainer.ema.n_averaged) == 6  # not 6 x 4 micro-batches


def test_caller_rng_is_restored(mlp_workload):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    Trainer(mlp_workload, TrainConfig(global_batch=32, steps=2)).run()
    assert torch.equal(torch.rand(3), expected)
