"""LARS and LAMB: true to the papers' update rules, p.grad untouched, state round trip, convergence."""

import copy

import pytest
import torch
from torch import nn

from batchpilot import BatchpilotError, get_workload
from batchpilot.optim import LAMB, LARS, OPTIMIZERS, exclude_bias_and_norm, with_optimizer
from batchpilot.train import TrainConfig, Trainer


def _problem(seed=0):
    """A small least-squares problem with a known optimum (loss 0 at w*)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=g, dtype=torch.float64)
    w_star = torch.randn(10, 3, generator=g, dtype=torch.float64)
    return x, x @ w_star


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def test_lars_one_step_matches_algorithm_1():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    g = torch.randn(4, 3, dtype=torch.float64)
    w0 = w.detach().clone()
    lr, m, beta, eta = 0.5, 0.9, 1e-3, 0.01
    opt = LARS([w], lr=lr, momentum=m, weight_decay=beta, trust_coefficient=eta)
    v = torch.zeros_like(w0)
    for _ in range(3):
        wt = w.detach().clone()
        w.grad = g.clone()
        local = wt.norm() / (g.norm() + beta * wt.norm())  # λ = ||w|| / (||g|| + β||w||)
        v = m * v + lr * eta * local * (g + beta * wt)
        opt.step()
        torch.testing.assert_close(w.detach(), wt - v, rtol=1e-12, atol=1e-14)
    assert not torch.equal(w.detach(), w0)


def test_lamb_one_step_matches_algorithm_2():
    torch.manual_seed(1)
    x = nn.Parameter(torch.randn(5, 2, dtype=torch.float64))
    lr, (b1, b2), eps, lam = 0.01, (0.9, 0.999), 1e-6, 0.01
    opt = LAMB([x], lr=lr, betas=(b1, b2), eps=eps, weight_decay=lam)
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    for t in range(1, 4):
        g = torch.randn(5, 2, dtype=torch.float64)
        x.grad = g
        xt = x.detach().clone()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        r = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        u = r + lam * xt
        opt.step()
        torch.testing.assert_close(x.detach(), xt - lr * xt.norm() / u.norm() * u, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [lambda p: LARS(p, lr=1.0, weight_decay=1e-4), lambda p: LAMB(p, lr=0.01)])
def test_step_does_not_modify_grad(make):
    model = _model()
    x, y = _problem()
    opt = make(model.parameters())
    for _ in range(2):
        opt.zero_grad()
        _loss(model, x, y).backward()
        before = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for b, p in zip(before, model.parameters()):
            assert torch.equal(b, p.grad)


@pytest.mark.parametrize("make", [lambda p: LARS(p, lr=2.0, weight_decay=1e-4), lambda p: LAMB(p, lr=0.01)])
def test_state_dict_round_trip_continues_identically(make):
    x, y = _problem()
    a = _model()
    opt_a = make(a.parameters())
    for _ in range(5):
        opt_a.zero_grad()
        _loss(a, x, y).backward()
        opt_a.step()
    b = copy.deepcopy(a)
    opt_b = make(b.parameters())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.state_dict()["state"].keys() == opt_a.state_dict()["state"].keys()
    for model, opt in ((a, opt_a), (b, opt_b)):
        for _ in range(5):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("make,lr", [(LARS, 5.0), (LAMB, 0.02)])
def test_converges_on_small_problem(make, lr):
    x, y = _problem()
    model = _model()
    opt = make(model.parameters(), lr=lr)
    with torch.no_grad():
        first = float(_loss(model, x, y))
    for _ in range(300):
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(_loss(model, x, y)) < 0.05 * first


def test_trust_ratio_is_one_for_zero_weights():
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    w.grad = torch.ones(3, dtype=torch.float64)
    LARS([w], lr=0.1, momentum=0.0).step()
    torch.testing.assert_close(w.detach(), torch.full((3,), -0.1, dtype=torch.float64))


def test_exclude_bias_and_norm_groups():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    groups = exclude_bias_and_norm(model, 1e-4)
    assert [len(g["params"]) for g in groups] == [2, 4]
    assert groups[1]["adapt"] is False and groups[1]["weight_decay"] == 0.0
    opt = LARS(groups, lr=1.0)
    assert opt.param_groups[0]["adapt"] is True


def test_bad_hyperparameters_are_refused():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(BatchpilotError, match="momentum"):
        LARS(p, momentum=1.5)
    with pytest.raises(BatchpilotError, match="betas"):
        LAMB(p, betas=(0.9, 1.0))
    with pytest.raises(BatchpilotError, match="optimizer must be one of"):
        with_optimizer(get_workload("mnist1d-mlp", num_train=100, num_val=20), "adagrad")


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_trainer_trains_mnist1d_mlp_to_finite_loss(name):
    w = get_workload("mnist1d-mlp", num_train=600, num_val=200)
    trainer = Trainer(w, TrainConfig(global_batch=64, steps=30, optimizer=name, seed=0))
    r = trainer.run()
    assert r.status == "completed" and r.optimizer == name
    assert torch.isfinite(torch.tensor(r.final_train_loss)) and r.final_train_loss < 2.30  # below log(10) at init
    assert type(trainer.workload.make_optimizer([nn.Parameter(torch.zeros(2, 2))], 0.1)).__name__.lower() == name
    # the rule follows the optimizer: LARS is SGD-like (linear), LAMB is Adam-like (sqrt)
    assert r.lr_rule == {"lars": "linear", "lamb": "sqrt"}[name]


def test_with_optimizer_keeps_a_matching_workload():
    w = get_workload("mnist1d-mlp", num_train=100, num_val=20)
    assert with_optimizer(w, "sgd") is w and with_optimizer(w, "default") is w
    assert with_optimizer(w, "adamw").base_lr != w.base_lr
    assert set(OPTIMIZERS) == {"default", "sgd", "adamw", "lars", "lamb"}
