"""``batchpilot.doctor.check`` on live objects: what it infers, what it finds, and that nothing changes."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from batchpilot.doctor import check, inspect_objects
from batchpilot.errors import BatchpilotError


def bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def ln_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))


def loader(batch: int, n: int = 1000, **kw) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 4), torch.randint(0, 2, (n,))), batch_size=batch, **kw)


def codes(findings) -> dict[str, str]:
    return {f.code: f.severity for f in findings}


def train_steps(model, opt, sched, ema, data, accumulation, steps, per_micro: bool) -> None:
    """A small accumulation loop; ``per_micro`` steps the scheduler and EMA after every backward (the bug)."""
    it = iter(data)
    for _ in range(steps):
        for _ in range(accumulation):
            x, y = next(it)
            (nn.functional.cross_entropy(model(x), y) / accumulation).backward()
            if per_micro:
                sched.step()
                ema.update_parameters(model)
        opt.step()
        opt.zero_grad()
        if not per_micro:
            sched.step()
            ema.update_parameters(model)


def test_bad_live_setup_reports_unscaled_lr_no_warmup_and_bn_with_accumulation():
    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = lrs.StepLR(opt, step_size=100)
    got = check(model, opt, sched, loader(32), accumulation_steps=8, base_batch=64, base_lr=0.1)
    c = codes(got)
    assert c["BP201"] == "error" and c["BP206"] == "warning" and c["BP504"] == "warning"
    bp201 = next(f for f in got if f.code == "BP201")
    assert "global batch 256" in bp201.message and "0.4" in bp201.message


def test_clean_live_setup_has_no_errors():
    model = ln_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.4)
    sched = lrs.LinearLR(opt, start_factor=0.01, total_iters=100)
    got = check(model, opt, sched, loader(64, n=1024), accumulation_steps=4, base_batch=64, base_lr=0.1,
                scheduler_step="per_optimizer_step", zero_grad="per_optimizer_step", loss_scaled_by_accumulation=True,
                validated=True, throughput_measured=True, max_micro_batch=64)
    assert got == []


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_step_counters_reveal_scheduler_and_ema_stepped_per_micro_batch():
    torch.manual_seed(0)
    for per_micro, expect in ((True, "error"), (False, None)):
        model = ln_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = lrs.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
        data = loader(16)
        train_steps(model, opt, sched, ema, data, accumulation=4, steps=3, per_micro=per_micro)
        inferred = inspect_objects(model, opt, sched, data, ema, accumulation_steps=4)
        assert inferred["scheduler_step"] == ("per_micro_batch" if per_micro else "per_optimizer_step")
        c = codes(check(model, opt, sched, data, ema=ema, accumulation_steps=4))
        assert c.get("BP601") == expect and c.get("BP602") == expect


@pytest.mark.parametrize("make, warmup, peak", [
    (lambda o: lrs.LinearLR(o, start_factor=0.01, total_iters=50), 50, 0.1),
    (lambda o: lrs.LambdaLR(o, lambda s: min(1.0, s / 200) * 4), 200, 0.4),  # seed pitfall 3: ramp to 4x base
    (lambda o: lrs.OneCycleLR(o, max_lr=0.8, total_steps=1000, pct_start=0.1), 99, 0.8),
    (lambda o: lrs.SequentialLR(o, [lrs.LinearLR(o, 0.1, total_iters=30), lrs.CosineAnnealingLR(o, 100)], [30]), 30, 0.1),
    (lambda o: lrs.CosineAnnealingLR(o, 100), 0, 0.1),
])
def test_warmup_and_peak_lr_inferred_from_the_scheduler(make, warmup, peak):
    opt = torch.optim.SGD(ln_model().parameters(), lr=0.1)
    inferred = inspect_objects(optimizer=opt, scheduler=make(opt))
    assert inferred["warmup_steps"] == warmup
    assert inferred["lr"] == pytest.approx(peak)


def test_dataparallel_with_batchnorm():
    dp = nn.DataParallel(bn_model())
    dp.device_ids = [0, 1]  # as on a two-GPU machine; only read, never run
    inferred = inspect_objects(dp, data_loader=loader(64))
    assert inferred["parallel"] == "dp" and inferred["world_size"] == 2 and inferred["micro_batch_per_rank"] == 32
    assert "BP503" in codes(check(dp, data_loader=loader(64)))


def test_fields_override_inference():
    c = codes(check(bn_model(), data_loader=loader(32), world_size=4))
    assert c["BP502"] == "warning"
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(bn_model())
    assert "BP502" not in codes(check(synced, data_loader=loader(32), world_size=4))


def test_bad_arguments_raise_batchpilot_error():
    with pytest.raises(BatchpilotError, match="unknown doctor field"):
        check(bn_model(), bacth=3)
    with pytest.raises(BatchpilotError, match="accumulation_steps"):
        check(bn_model(), accumulation_steps=0)
    with pytest.raises(BatchpilotError, match="lr must be"):
        check(bn_model(), lr=-1.0)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_check_changes_nothing():
    torch.manual_seed(1)
    model = bn_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = lrs.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
    data = loader(16, shuffle=True)
    train_steps(model, opt, sched, ema, data, accumulation=2, steps=2, per_micro=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.eval()
    before = dict(model=copy.deepcopy(model.state_dict()), opt=copy.deepcopy(opt.state_dict()),
                  sched=copy.deepcopy(sched.state_dict()), ema=copy.deepcopy(ema.state_dict()),
                  grads=[p.grad.clone() for p in model.parameters()], lrs=[g["lr"] for g in opt.param_groups])
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    check(model, opt, sched, data, ema=ema, accumulation_steps=2, base_batch=16, base_lr=1e-3)
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(before["model"].values(), model.state_dict().values()))
    assert all(torch.equal(g, p.grad) for g, p in zip(before["grads"], model.parameters()))
    assert str(before["opt"]) == str(opt.state_dict()) and before["lrs"] == [g["lr"] for g in opt.param_groups]
    assert before["sched"].keys() == sched.state_dict().keys()
    assert {k: v for k, v in before["sched"].items() if k != "lr_lambdas"} == \
           {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    assert all(torch.equal(a, b) for a, b in zip(before["ema"].values(), ema.state_dict().values()))
    assert torch.equal(rng[0], torch.get_rng_state()) and rng[1] == random.getstate()
    assert np.array_equal(rng[2], np.random.get_state()[1])
