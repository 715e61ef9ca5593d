"""Sharpness: power iteration and Hutchinson agree with the exact Hessian; the model is untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.errors import BatchpilotError
from batchpilot.sweep.sharpness import hutchinson_trace, make_hvp, measure_sharpness, top_eigenvalue
from batchpilot.workloads import Workload
from batchpilot.workloads.common import correct_sum, cross_entropy_sum


class Tiny(nn.Module):
    def __init__(self, bn: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def _workload(model_fn, n: int = 64) -> Workload:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return Workload(name="tiny", make_model=model_fn, train_data=TensorDataset(x, y), val_data=TensorDataset(x, y),
                    loss_sum=cross_entropy_sum, metric_sum=correct_sum,
                    make_optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr), base_batch=8, base_lr=0.1)


def _exact_hessian(model: nn.Module, w: Workload) -> torch.Tensor:
    x, y = w.train_data.tensors
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        params, i = {}, 0
        for k, s in zip(names, shapes):
            params[k] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        return w.loss_sum(torch.func.functional_call(model, params, (x,)), y) / len(y)

    return torch.autograd.functional.hessian(f, flat0)


def test_hvp_eigenvalue_and_trace_match_exact_hessian():
    torch.manual_seed(0)
    model = Tiny().double().eval()
    w = _workload(lambda: Tiny())
    H = _exact_hessian(model, w)
    eig = torch.linalg.eigvalsh(H)
    top = eig[eig.abs().argmax()]
    res = measure_sharpness(model, w, num_samples=64, max_iters=500, tol=1e-10, probes=1000, seed=3)
    assert res.mode == "eval" and res.num_samples == 64
    assert res.top_eigenvalue == pytest.approx(float(top), rel=1e-4)
    assert res.converged
    # Hutchinson: unbiased; 2000 probes put the true trace within a few standard errors.
    assert abs(res.trace - float(torch.trace(H))) < 4 * res.trace_stderr + 1e-9
    assert res.trace_stderr < 0.05 * abs(float(torch.trace(H)))


def test_hvp_equals_hessian_times_vector_in_chunks():
    torch.manual_seed(0)
    model = Tiny().double().eval()
    w = _workload(lambda: Tiny())
    H = _exact_hessian(model, w)
    x, y = w.train_data.tensors
    hvp = make_hvp(model, w.loss_sum, [(x[:20], y[:20]), (x[20:], y[20:])], total_units=len(y))
    v = {k: torch.randn_like(p) for k, p in hvp.params.items()}
    flat_v = torch.cat([t.reshape(-1) for t in v.values()])
    got = torch.cat([t.reshape(-1) for t in hvp(v).values()])
    torch.testing.assert_close(got, H @ flat_v)


def test_power_iteration_on_a_known_matrix():
    A = torch.diag(torch.tensor([5.0, -2.0, 1.0, 0.5], dtype=torch.float64))
    hvp = lambda v: {"a": A @ v["a"]}  # noqa: E731
    value, iters, ok = top_eigenvalue(hvp, {"a": torch.zeros(4, dtype=torch.float64)}, max_iters=200, tol=1e-12,
                                      generator=torch.Generator().manual_seed(0))
    assert ok and value == pytest.approx(5.0, rel=1e-9)
    tr, err = hutchinson_trace(hvp, {"a": torch.zeros(4, dtype=torch.float64)}, probes=5,
                               generator=torch.Generator().manual_seed(0))
    assert tr == pytest.approx(4.5)  # diagonal: every Rademacher probe gives the exact trace
    assert err == pytest.approx(0.0)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_model_grads_buffers_modes_and_rng_untouched(mode):
    torch.manual_seed(0)
    model = Tiny(bn=True, dropout=0.2).double()
    model.train()
    model.fc2.eval()  # a mixed mode must survive
    w = _workload(lambda: Tiny(bn=True))
    x, y = w.train_data.tensors
    w.loss_sum(model(x), y).backward()  # the user has gradients in flight
    before_state = copy.deepcopy(model.state_dict())
    before_grads = [p.grad.clone() for p in model.parameters()]
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    res = measure_sharpness(model, w, mode=mode, num_samples=32, max_iters=5, probes=3)
    assert res.mode == mode
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    for p, g in zip(model.parameters(), before_grads):
        assert torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)


def test_train_and_eval_mode_differ_with_batchnorm():
    torch.manual_seed(0)
    model = Tiny(bn=True).double()
    w = _workload(lambda: Tiny(bn=True))
    x, _ = w.train_data.tensors
    with torch.no_grad():  # move the running stats away from the batch stats
        model.train()
        for _ in range(3):
            model(x * 3 + 1)
    a = measure_sharpness(model, w, mode="eval", num_samples=64, probes=0)
    b = measure_sharpness(model, w, mode="train", num_samples=64, probes=0)
    assert a.top_eigenvalue != pytest.approx(b.top_eigenvalue, rel=1e-3)
    again = measure_sharpness(model, w, mode="train", num_samples=64, probes=0)
    assert again.top_eigenvalue == b.top_eigenvalue  # deterministic


def test_bad_inputs():
    w = _workload(lambda: Tiny())
    model = Tiny().double()
    with pytest.raises(BatchpilotError, match="mode"):
        measure_sharpness(model, w, mode="test")
    with pytest.raises(BatchpilotError, match="samples"):
        measure_sharpness(model, w, num_samples=0)
    with pytest.raises(BatchpilotError, match="probes"):
        measure_sharpness(model, w, probes=-1)
