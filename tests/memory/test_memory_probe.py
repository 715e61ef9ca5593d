"""find_max_batch on CPU with an injected fake OOM above a byte budget (as accelerate's tests do)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from batchpilot.workloads.data import EpochBatchSampler
from batchpilot.errors import BatchpilotError
from batchpilot.memory import find_max_batch, is_oom

PER_SAMPLE = 1000
FIXED = 5000


class Net(nn.Module):
    """BatchNorm (buffers change in forward), dropout (consumes RNG), two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.bn(self.fc1(x))))


def _fake_oom_model(budget_bytes: int, where: str) -> tuple[Net, list[int]]:
    """A Net that raises the CUDA OOM error when FIXED + PER_SAMPLE * batch > budget.

    ``where``: "forward" raises after fc1 and BN ran (buffers touched), "step" raises after the
    optimizer already updated the weights (in a step post-hook).
    """
    model = Net()
    seen: list[int] = []

    def check(batch: int) -> None:
        seen.append(batch)
        if FIXED + PER_SAMPLE * batch > budget_bytes:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {PER_SAMPLE * batch} bytes")

    if where == "forward":
        model.bn.register_forward_hook(lambda mod, inp, out: check(inp[0].shape[0]))
    model._check = check  # type: ignore[attr-defined]
    return model, seen


def _setup(where: str = "forward", budget: int = FIXED + PER_SAMPLE * 100, warm: bool = True):
    torch.manual_seed(0)
    model, seen = _fake_oom_model(budget, where)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data_x = torch.randn(512, 8)
    data_y = torch.randint(0, 3, (512,))
    if warm:  # a trained state: optimizer state and grads exist
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(data_x[:32]), data_y[:32]).backward()
            opt.step()
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(data_x[:32]), data_y[:32]).backward()  # live grads
    if where == "step":
        last = {}

        def post(o, args, kwargs):
            model._check(last["b"])

        opt.register_step_post_hook(post)
        orig = model.forward

        def fwd(x):
            last["b"] = x.shape[0]
            return orig(x)

        model.forward = fwd
    return model, opt, seen, (lambda b: (data_x[:b] if b <= 512 else data_x.repeat(b // 512 + 1, 1)[:b],
                                         data_y[:b] if b <= 512 else data_y.repeat(b // 512 + 1)[:b]))


def _loss(out, y):
    return nn.functional.cross_entropy(out, y, reduction="sum")


def _state(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [b.clone() for b in model.buffers()],
            {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()} for k, v in opt.state_dict()["state"].items()},
            torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), model.training)


def _assert_same(a, b):
    for xa, xb in zip(a[0], b[0]):
        assert torch.equal(xa, xb)
    for ga, gb in zip(a[1], b[1]):
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    for xa, xb in zip(a[2], b[2]):
        assert torch.equal(xa, xb)
    assert a[3].keys() == b[3].keys()
    for k in a[3]:
        for kk in a[3][k]:
            va, vb = a[3][k][kk], b[3][k][kk]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb
    assert torch.equal(a[4], b[4]) and a[5] == b[5] and np.array_equal(a[6], b[6]) and a[7] == b[7]


@pytest.mark.parametrize("where", ["forward", "step"])
def test_good_prediction_needs_few_trials_and_leaves_state_bit_identical(where):
    model, opt, seen, make_batch = _setup(where)
    sampler = EpochBatchSampler(512, seed=3)
    sampler.next_batch(32)  # the user's data order, mid-epoch
    twin = EpochBatchSampler(512, seed=3)
    twin.next_batch(32)
    model.eval()  # a non-default mode must come back too
    before = _state(model, opt)
    res = find_max_batch(model, opt, make_batch, _loss, predicted=95)  # true max is 100
    after = _state(model, opt)
    _assert_same(before, after)
    assert sampler.state_dict() == twin.state_dict()
    assert torch.equal(sampler.next_batch(32), twin.next_batch(32))
    assert res.max_micro_batch <= 100
    assert res.first_failing is not None and res.first_failing > 100
    assert res.max_micro_batch >= 95
    assert len(res.trials) <= 3 and res.oom_count <= 1
    assert res.trials[0].micro_batch == 95 and res.trials[0].fits


def test_overestimate_shrinks_then_brackets():
    model, opt, seen, make_batch = _setup("forward")
    before = _state(model, opt)
    res = find_max_batch(model, opt, make_batch, _loss, predicted=200, tolerance=0.0, max_trials=20)
    _assert_same(before, _state(model, opt))
    assert res.max_micro_batch == 100 and res.first_failing == 101
    assert not res.trials[0].fits


def test_fresh_optimizer_stays_stateless_and_underestimate_grows():
    model, opt, seen, make_batch = _setup("forward", warm=False)
    assert not opt.state
    res = find_max_batch(model, opt, make_batch, _loss, predicted=10, tolerance=0.0, max_trials=30)
    assert not opt.state  # no optimizer state was created behind the caller's back
    assert all(p.grad is None for p in model.parameters())
    assert res.max_micro_batch == 100 and res.first_failing == 101


def test_non_oom_errors_propagate_after_restoring():
    model, opt, seen, make_batch = _setup("forward")
    before = _state(model, opt)

    def bad_loss(out, y):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        find_max_batch(model, opt, make_batch, bad_loss, predicted=10)
    _assert_same(before, _state(model, opt))


def test_is_oom_recognises_allocator_messages():
    assert is_oom(torch.OutOfMemoryError("x"))
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED."))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))


def test_bad_arguments():
    model, opt, seen, make_batch = _setup("forward")
    with pytest.raises(BatchpilotError):
        find_max_batch(model, opt, make_batch, _loss, predicted=0)


class _Capped(nn.Module):
    """Raises the allocator's OOM message when the batch exceeds 40 rows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 40:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")
        return self.fc(x)


def test_probe_workload_builds_its_own_objects_and_keeps_global_rng():
    from torch.utils.data import TensorDataset

    from batchpilot.memory import probe_workload
    from batchpilot.workloads import Workload

    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    w = Workload(name="capped", make_model=_Capped, train_data=TensorDataset(x, y), val_data=TensorDataset(x, y),
                 loss_sum=_loss, make_optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
                 base_batch=8, base_lr=0.1)
    rng = torch.get_rng_state()
    res = probe_workload(w, 38, device="cpu", tolerance=0.0)
    assert torch.equal(rng, torch.get_rng_state())
    assert res.max_micro_batch == 40 and res.first_failing == 41
    assert [(t.micro_batch, t.fits) for t in res.trials] == [(38, True), (42, False), (40, True), (41, False)]
