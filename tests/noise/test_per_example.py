"""Per-example gradient norms from hooks, and B_simple from them, against torch.func per-sample gradients.

The reference is independent of the hooks: ``torch.func.vmap(grad(loss_i))`` over the same batch, in
float64, gives every example's full gradient; its squared norms and sample statistics are what the
hooks' norms and the estimator must reproduce.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchpilot.errors import BatchpilotError
from batchpilot.noise.microbatch import two_batch_estimates
from batchpilot.noise.layer_rules import _gram_is_cheaper
from batchpilot.noise.per_example import PerExampleEstimate, PerExampleNoiseScale, rule_for
from noise_reference import per_sample_grads  # tests/noise/noise_reference.py


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """The reference comparisons run in float64 (parameters and data made inside the tests)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


# -- the reference -------------------------------------------------------------------------------------------
def flat(grads: dict[str, torch.Tensor], names=None) -> torch.Tensor:
    keys = [k for k in grads if names is None or k in names]
    n = next(iter(grads.values())).shape[0]
    return torch.cat([grads[k].reshape(n, -1) for k in keys], 1)


def module_sq(grads: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """Per-example squared norm over the parameters directly in module ``prefix``."""
    n = next(iter(grads.values())).shape[0]
    keys = [k for k in grads if k.rsplit(".", 1)[0] == prefix or (prefix == "" and "." not in k)]
    return sum(grads[k].reshape(n, -1).square().sum(1) for k in keys)


def exact_pair(g: torch.Tensor) -> tuple[float, float]:
    """Sample statistics of per-example gradients ``g (N, P)``: unbiased (|G|², tr Σ)."""
    n = g.shape[0]
    mean = g.mean(0)
    trace = float((g - mean).square().sum() / (n - 1))
    return float(mean @ mean) - trace / n, trace


def close(a, b, rtol=1e-6):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.allclose(a, b, rtol=rtol, atol=1e-12 * float(b.abs().max())), (a, b)


def ce_sum(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def check_layer_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_sum=ce_sum, units_per_example=1):
    """Hooks' per-example norms of the *mean* loss = reference per-example norms of the summed loss / U²."""
    mon = PerExampleNoiseScale(model)
    total = units_per_example * x.shape[0]
    (loss_sum(model(x), y) / total).backward()
    mon.after_micro(0, total)
    ref = per_sample_grads(model, loss_sum, x, y)
    assert mon.last_norms, "no layer was hooked"
    for name, sq in mon.last_norms.items():
        close(sq, module_sq(ref, name) / total**2)
    mon.detach()
    return mon


# -- per-example norms, layer by layer -------------------------------------------------------------------------
def test_linear_2d_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    mon = check_layer_norms(model, x, y)
    assert set(mon.last_norms) == {"0", "2"}


class SeqModel(nn.Module):
    """Linear on a sequence (both the Gram and the per-example-product forms), LayerNorm, a token head."""

    def __init__(self, d_in: int, d_hidden: int, vocab: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d_hidden)
        self.ln = nn.LayerNorm(d_hidden)
        self.out = nn.Linear(d_hidden, vocab, bias=False)

    def forward(self, x):
        return self.out(self.ln(torch.tanh(self.inp(x))))


@pytest.mark.parametrize("t,d_in,d_hidden,gram", [(6, 3, 4, False), (2, 16, 24, True)])
def test_linear_and_layernorm_on_sequences(t, d_in, d_hidden, gram):
    assert _gram_is_cheaper(t, d_in, d_hidden) is gram  # both forms are exercised
    torch.manual_seed(1)
    model = SeqModel(d_in, d_hidden)
    x, y = torch.randn(7, t, d_in), torch.randint(0, 5, (7, t))
    mon = check_layer_norms(model, x, y, units_per_example=t)
    assert set(mon.last_norms) == {"inp", "ln", "out"}


def test_linear_on_4d_input_and_frozen_bias():
    torch.manual_seed(2)
    lin = nn.Linear(4, 3)
    lin.bias.requires_grad_(False)
    model = nn.Sequential(lin)
    x, y = torch.randn(5, 2, 3, 4), torch.randint(0, 3, (5, 2, 3))
    check_layer_norms(model, x, y, units_per_example=6)


class TokModel(nn.Module):
    def __init__(self, vocab: int, dim: int, padding_idx=None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.norm = nn.RMSNorm(dim) if hasattr(nn, "RMSNorm") else nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, idx):
        return self.head(self.norm(self.emb(idx)))


@pytest.mark.parametrize("vocab,padding_idx", [(6, None), (6, 0), (400, 3)])  # small vocab: scatter; large: Gram
def test_embedding_and_rmsnorm(vocab, padding_idx):
    torch.manual_seed(3)
    model = TokModel(vocab, 5, padding_idx)
    t = 8
    idx = torch.randint(0, 6, (6, t))  # repeated indices within an example
    idx[0, :3] = 3
    y = torch.randint(0, 4, (6, t))
    mon = check_layer_norms(model, idx, y, units_per_example=t)
    assert set(mon.last_norms) == {"emb", "norm", "head"}


def test_embedding_one_index_per_example_is_a_batch_dim_only_with_2d_input():
    torch.manual_seed(4)
    model = TokModel(7, 5)
    idx = torch.randint(0, 7, (6, 1))
    check_layer_norms(model, idx, torch.randint(0, 4, (6, 1)))


class ConvNet(nn.Module):
    def __init__(self, conv: nn.Module, flat: int) -> None:
        super().__init__()
        self.conv = conv
        self.head = nn.Linear(flat, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


CONVS = [
    (lambda: nn.Conv1d(2, 4, 3, stride=2, padding=1), (2, 11)),
    (lambda: nn.Conv1d(4, 6, 3, padding="same", dilation=2, groups=2), (4, 9)),
    (lambda: nn.Conv1d(2, 3, 4, padding=2, padding_mode="reflect", bias=False), (2, 10)),
    (lambda: nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), (2, 40)),  # long: Gram form
    (lambda: nn.Conv2d(2, 4, 3, stride=(2, 1), padding=1), (2, 5, 6)),
    (lambda: nn.Conv2d(4, 4, (2, 3), groups=4, padding="same", padding_mode="replicate"), (4, 4, 5)),
    (lambda: nn.Conv2d(1, 2, 2, dilation=2), (1, 9, 9)),
    (lambda: nn.Conv1d(16, 32, 3, stride=2, groups=2), (16, 6)),  # few positions, wide channels: Gram form
    (lambda: nn.Conv2d(8, 12, 2, padding=0), (8, 3, 2)),  # Gram form
    (lambda: nn.Conv1d(8, 8, 3, padding=1), (8, 12)),  # wide input, many positions: offset by offset
]


def test_the_cost_model_picks_several_conv_routes():
    from batchpilot.noise.conv_rule import conv_route

    routes = set()
    for make, shape in CONVS:
        conv = make()
        with torch.no_grad():
            out = conv(torch.zeros(1, *shape))
        g = conv.groups
        padded = math.prod(s + 2 * p for s, p in zip(shape[1:], conv.padding)) if not isinstance(conv.padding, str) \
            else math.prod(shape[1:])
        routes.add(conv_route(5 * g, out[0, 0].numel(), padded, conv.in_channels // g, math.prod(conv.kernel_size),
                              conv.out_channels // g))
    assert len(routes) >= 2, routes
    # mnist1d-cnn's middle layers (Conv1d(32, 32, 3), 20 positions, 128 examples) take the shifted Gram form
    assert conv_route(128, 20, 22, 32, 3, 32) == "shifted-gram"
    assert conv_route(128, 20, 44, 1, 5, 32) == "im2col"  # its first layer: one input channel


@pytest.mark.parametrize("route", [None, "shifted-gram", "gram", "im2col", "offsets"])
@pytest.mark.parametrize("make,shape", CONVS)
def test_conv(make, shape, route, monkeypatch):
    """Each conv against torch.func, by the route the cost model picks and by each route forced."""
    import batchpilot.noise.conv_rule as cr

    monkeypatch.setattr(cr, "_FORCE_ROUTE", route)
    torch.manual_seed(5)
    conv = make()
    with torch.no_grad():
        flat_dim = conv(torch.zeros(1, *shape)).numel()
    model = ConvNet(conv, flat_dim)
    x, y = torch.randn(5, *shape), torch.randint(0, 3, (5,))
    mon = check_layer_norms(model, x, y)
    assert set(mon.last_norms) == {"conv", "head"}


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D (GPT-2's linear layers: weight (in, out)), copied in spirit."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


def test_transformers_conv1d():
    torch.manual_seed(6)
    model = nn.Sequential(Conv1D(6, 4), nn.Tanh(), Conv1D(3, 6))
    assert rule_for(model[0]) is not None
    x, y = torch.randn(5, 7, 4), torch.randint(0, 3, (5, 7))
    check_layer_norms(model, x, y, units_per_example=7)


# -- B_simple from the norms -------------------------------------------------------------------------------------
class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 3, padding=1)
        self.ln = nn.LayerNorm(3 * 8)
        self.fc = nn.Linear(3 * 8, 4)

    def forward(self, x):
        return self.fc(self.ln(torch.relu(self.conv(x.unsqueeze(1))).flatten(1)))


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_b_simple_matches_the_exact_value_from_per_sample_gradients():
    torch.manual_seed(7)
    model = Small()
    x, y = _batch()
    mon = PerExampleNoiseScale(model)
    F.cross_entropy(model(x), y).backward()  # mean over the batch
    grads_before = [p.grad.clone() for p in model.parameters()]
    g_sq, trace = mon.observe()
    ref = flat(per_sample_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y))
    ex_g, ex_t = exact_pair(ref)
    close(g_sq, ex_g)
    close(trace, ex_t)
    est = mon.estimate()
    assert isinstance(est, PerExampleEstimate) and est.n_updates == 1
    close(est.b_simple, ex_t / ex_g)
    assert est.covered_fraction == 1.0 and est.excluded == () and est.fallback == ()
    # the monitor read p.grad and changed nothing
    assert all(torch.equal(a, p.grad) for a, p in zip(grads_before, model.parameters()))


def test_loss_normalisation_mean_sum_and_units():
    """The mean loss's per-example gradient is 1/N of the example's; a summed loss needs loss_scale=N;
    tokens as units give tr(Σ) per token (x T), the same |G|²."""
    torch.manual_seed(8)
    model = Small()
    x, y = _batch()
    n = len(x)
    ref = flat(per_sample_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y))
    ex_g, ex_t = exact_pair(ref)

    mon = PerExampleNoiseScale(model)
    F.cross_entropy(model(x), y).backward()
    close(sum(mon_sq for mon_sq in _norms_after(mon)), ref.square().sum(1) / n**2)
    model.zero_grad()
    mon.detach()

    mon = PerExampleNoiseScale(model, loss_scale=n)  # summed loss = (n / U) · Σ, U = n
    F.cross_entropy(model(x), y, reduction="sum").backward()
    close(mon.observe(), (ex_g, ex_t))
    model.zero_grad()
    mon.detach()

    mon = PerExampleNoiseScale(model)  # each example counts 5 units: tr(Σ) per unit is 5x, |G|² the same
    F.cross_entropy(model(x), y).backward()
    close(mon.observe(units=[5] * n), (ex_g, 5 * ex_t))
    mon.detach()


def _norms_after(mon):
    mon.after_micro(0, None)
    out = list(mon.last_norms.values())
    mon.end_step()
    return out


def test_ragged_units_match_the_two_batch_formula_on_per_sample_gradients():
    """Token losses with ignored targets: example i has u_i units; the trainer's loss is Σ tokens / U."""
    torch.manual_seed(9)
    model = SeqModel(3, 6)
    t, n = 5, 8
    x, y = torch.randn(n, t, 3), torch.randint(0, 5, (n, t))
    y[0, 1:] = -100
    y[3, :2] = -100
    u = (y != -100).sum(1).double()

    def tok_sum(o, tt):
        return F.cross_entropy(o.reshape(-1, o.shape[-1]), tt.reshape(-1), reduction="sum", ignore_index=-100)

    mon = PerExampleNoiseScale(model)
    (tok_sum(model(x), y) / u.sum()).backward()
    got = mon.observe(units=u)
    ref = flat(per_sample_grads(model, tok_sum, x, y))  # gradients of the summed losses L_i
    small = (ref / u[:, None]).square().sum(1)  # |∇L_i / u_i|²
    big = (ref.sum(0) / u.sum()).square().sum()
    close(got, two_batch_estimates(small.tolist(), float(big), u.tolist(), float(u.sum())))


def test_accumulation_gives_the_estimate_of_the_whole_batch():
    torch.manual_seed(10)
    model = Small()
    x, y = _batch(12)
    mon = PerExampleNoiseScale(model)
    F.cross_entropy(model(x), y).backward()
    whole = mon.observe()
    model.zero_grad(set_to_none=True)
    for i, part in enumerate((slice(0, 5), slice(5, 12))):  # ragged micro-batches, loss / global count
        (F.cross_entropy(model(x[part]), y[part], reduction="sum") / 12).backward()
        mon.after_micro(i, part.stop - part.start)
    close(mon.end_step(), whole, rtol=1e-9)
    assert mon.n_updates == 2


def test_cheap_mode_covers_only_the_selected_layers():
    torch.manual_seed(11)
    model = Small()
    x, y = _batch()
    mon = PerExampleNoiseScale(model, layers="norm")
    F.cross_entropy(model(x), y).backward()
    got = mon.observe()
    assert set(mon.last_norms) == {"ln"}
    grads = per_sample_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y)
    close(got, exact_pair(flat(grads, {"ln.weight", "ln.bias"})))
    est = mon.estimate()
    assert est.scope == "layers" and est.covered_fraction == 1.0
    mon.detach()
    mon = PerExampleNoiseScale(model, layers=["fc", nn.Conv1d])
    F.cross_entropy(model(x), y).backward()
    mon.observe()
    assert set(mon.last_norms) == {"fc", "conv"}
    with pytest.raises(BatchpilotError):
        PerExampleNoiseScale(model, layers="norms")


# -- what the hooks cannot split falls back, and is reported ------------------------------------------------------
class TiedLM(nn.Module):
    """charlm's shape: tied token embedding/head (functional use), a position table indexed by arange."""

    def __init__(self, vocab=7, dim=6, seq=5) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.ln = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, idx):
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        h = h + self.mix(self.ln(h))
        return h @ self.tok.weight.T


def tok_sum(o, t):
    return F.cross_entropy(o.reshape(-1, o.shape[-1]), t.reshape(-1), reduction="sum")


def test_tied_weights_and_position_tables_fall_back_and_are_reported():
    torch.manual_seed(12)
    model = TiedLM()
    idx, y = torch.randint(0, 7, (8, 5)), torch.randint(0, 7, (8, 5))
    units = 5 * 8
    mon = PerExampleNoiseScale(model)
    (tok_sum(model(idx), y) / units).backward()
    got = mon.observe(units=[5] * 8)
    fb = dict(s.split(": ", 1) for s in mon.fallback_layers())
    assert set(fb) == {"tok", "pos"}
    assert "outside this call" in fb["tok"] and "batch" in fb["pos"]
    est = mon.estimate()
    assert set(est.excluded) == {"tok.weight", "pos.weight"} and est.method == "per-example"
    assert 0 < est.excluded_fraction < 1 and math.isclose(est.covered_fraction + est.excluded_fraction, 1)
    # the estimate is exact over the parameters it covers (per-token units: x 5)
    ref = per_sample_grads(model, tok_sum, idx, y)
    g_ref, t_ref = exact_pair(flat(ref, {"ln.weight", "ln.bias", "mix.weight", "mix.bias"}) / 5)
    close(got, (g_ref, 5 * t_ref))


def test_fallback_under_accumulation_adds_the_micro_batch_estimate():
    torch.manual_seed(13)
    model = TiedLM()
    idx, y = torch.randint(0, 7, (8, 5)), torch.randint(0, 7, (8, 5))
    mon = PerExampleNoiseScale(model)
    parts = (slice(0, 3), slice(3, 8))
    for i, part in enumerate(parts):  # the first step checks the layers (and finds the tied one)
        (tok_sum(model(idx[part]), y[part]) / 40).backward()
        mon.after_micro(i, 5 * (part.stop - part.start))
    mon.end_step()
    model.zero_grad(set_to_none=True)
    micro_sq = {}
    for i, part in enumerate(parts):
        before = {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()}
        (tok_sum(model(idx[part]), y[part]) / 40).backward()
        micro_sq[i] = {k: p.grad - before[k] for k, p in model.named_parameters()}
        mon.after_micro(i, 5 * (part.stop - part.start))
    big = {k: p.grad.clone() for k, p in model.named_parameters()}
    got = mon.end_step()
    est = mon.estimate()
    assert est.method == "per-example+micro-batches" and est.excluded == ()
    ref = per_sample_grads(model, tok_sum, idx, y)
    covered = {"ln.weight", "ln.bias", "mix.weight", "mix.bias"}
    g1, t1 = exact_pair(flat(ref, covered) / 5)
    t1 *= 5
    fb = ["tok.weight", "pos.weight"]
    sizes = [15, 25]
    small = [sum(float((micro_sq[i][k] * 40 / sizes[i]).square().sum()) for k in fb) for i in range(2)]
    g2, t2 = two_batch_estimates(small, sum(float(big[k].square().sum()) for k in fb), sizes, 40)
    close(got, (g1 + g2, t1 + t2))


def test_without_accumulation_the_fallback_takes_no_snapshot():
    torch.manual_seed(19)
    model = TiedLM()
    idx, y = torch.randint(0, 7, (8, 5)), torch.randint(0, 7, (8, 5))
    mon = PerExampleNoiseScale(model)
    for _ in range(3):
        (tok_sum(model(idx), y) / 40).backward()
        mon.after_micro(0, 40)
        model.zero_grad(set_to_none=True)
    assert mon._fallback_monitor._steps_seen == 1  # after the first step: no copy of the fallback gradients
    assert mon.estimate().method == "per-example" and mon.n_updates == 3


def test_a_layer_called_twice_falls_back():
    torch.manual_seed(14)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    mon = PerExampleNoiseScale(model)
    F.mse_loss(model(torch.randn(6, 4)), torch.randn(6, 4)).backward()
    assert mon.observe() is None
    assert mon.fallback_layers() == ("0: Linear called 2 times in one forward",)


def test_batchnorm_is_a_caveat():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    mon = PerExampleNoiseScale(model)
    F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
    mon.observe()
    est = mon.estimate()
    assert est.caveats and "BatchNorm" in est.caveats[0]
    assert any(k.startswith("1.") for k in est.excluded)


# -- the monitor leaves the model alone ----------------------------------------------------------------------------
def _run(model, x, y, mon=None):
    out = model(x)
    F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
    if mon is not None:
        mon.observe()
    res = out.detach().clone(), [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return res


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_and_gradients_are_bit_identical_and_detach_removes_every_hook(dtype):
    torch.manual_seed(15)
    model = TiedLM().to(dtype)
    idx, y = torch.randint(0, 7, (8, 5)), torch.randint(0, 7, (8, 5))
    plain = _run(model, idx, y)
    mon = PerExampleNoiseScale(model)
    for _ in range(2):  # the checking step, then an ordinary one
        out, grads = _run(model, idx, y, mon)
        assert torch.equal(out, plain[0])
        assert all(torch.equal(a, b) for a, b in zip(grads, plain[1]))
    mon.detach()
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    for p in model.parameters():
        assert not p._backward_hooks
    again = _run(model, idx, y)
    assert torch.equal(again[0], plain[0]) and all(torch.equal(a, b) for a, b in zip(again[1], plain[1]))
    assert mon.n_updates == 2  # the estimates stay after detach


def test_no_grad_forwards_and_inputs_are_left_alone():
    model = Small()
    x, y = _batch()
    x0 = x.clone()
    mon = PerExampleNoiseScale(model)
    with torch.no_grad():
        model(x)  # an evaluation in between records nothing
    F.cross_entropy(model(x), y).backward()
    assert mon.observe() is not None
    assert torch.equal(x, x0)


def test_trainer_without_accumulation():
    from batchpilot import get_workload
    from batchpilot.train import TrainConfig, Trainer

    torch.set_default_dtype(torch.float32)  # the workload's own dtype
    try:
        w = get_workload("mnist1d-mlp", num_train=600, num_val=200)
        mon = PerExampleNoiseScale()
        Trainer(w, TrainConfig(global_batch=32, steps=6, seed=0), noise=mon).run()
        est = mon.estimate()
        assert est.n_updates == 6  # the trainer binds the monitor to the model it builds: every step
        assert est.b_simple > 0 and est.b_simple_low <= est.b_simple <= est.b_simple_high
        assert est.covered_fraction == 1.0
    finally:
        torch.set_default_dtype(torch.float64)


def test_a_subset_of_examples_keeps_both_terms_unbiased():
    """max_examples=m: the small-batch term from the first m examples, the big one from the whole batch."""
    torch.manual_seed(16)
    model = Small()
    x, y = _batch(12)
    mon = PerExampleNoiseScale(model, max_examples=5)
    F.cross_entropy(model(x), y).backward()
    got = mon.observe()
    assert all(v.shape == (5,) for v in mon.last_norms.values())
    ref = flat(per_sample_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y))
    small = ref[:5].square().sum(1)
    close(got, two_batch_estimates(small.tolist(), float(ref.mean(0).square().sum()), 1, 12))
    with pytest.raises(BatchpilotError):
        PerExampleNoiseScale(model, max_examples=1)


class NormVariants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.LayerNorm(6)
        self.b = nn.LayerNorm(6, bias=False)
        self.c = nn.LayerNorm(6)
        self.d = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.c(self.b(self.a(x)))
        h = self.d(h)
        h.mul_(1.5)  # the output modified in place after the layer: x̂ is recomputed from the input
        return self.head(h)


def test_layernorm_with_zero_weight_large_bias_and_an_in_place_output():
    torch.manual_seed(17)
    model = NormVariants()
    with torch.no_grad():
        model.a.weight[2] = 0.0  # a zero in the weight: the output cannot give x̂
        model.a.bias.normal_()
        model.b.weight.normal_()
        model.c.bias.fill_(1e4)  # |b| > 1e3 |w|
        model.d.weight.uniform_(0.5, 1.5)
        model.d.bias.normal_()
    x, y = torch.randn(7, 4, 6), torch.randint(0, 3, (7, 4))
    mon = check_layer_norms(model, x, y, units_per_example=4)
    assert set(mon.last_norms) == {"a", "b", "c", "d", "head"}


def test_the_cheap_preset_keeps_norms_and_linear_layers_without_positions():
    torch.manual_seed(18)
    model = SeqModel(3, 6)
    mon = PerExampleNoiseScale(model, layers="cheap")
    x, y = torch.randn(5, 4, 3), torch.randint(0, 5, (5, 4))
    (ce_sum(model(x), y) / 20).backward()
    got = mon.observe(units=[4] * 5)
    assert set(mon.last_norms) == {"ln"}
    grads = per_sample_grads(model, ce_sum, x, y)
    g_ref, t_ref = exact_pair(flat(grads, {"ln.weight", "ln.bias"}) / 4)
    close(got, (g_ref, 4 * t_ref))
    model2 = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    mon2 = PerExampleNoiseScale(model2, layers="cheap")
    F.cross_entropy(model2(torch.randn(6, 4)), torch.randint(0, 2, (6,))).backward()
    mon2.observe()
    assert set(mon2.last_norms) == {"0", "1", "2"}


def test_state_dict_round_trip_and_reset():
    model = Small()
    mon = PerExampleNoiseScale(model)
    for seed in range(3):
        x, y = _batch(seed=seed)
        F.cross_entropy(model(x), y).backward()
        mon.observe()
        model.zero_grad()
    state = mon.state_dict()
    other = PerExampleNoiseScale(Small())
    other.load_state_dict(state)
    assert other.history == mon.history and other.estimate().b_simple == mon.estimate().b_simple
    mon.reset()
    assert mon.n_updates == 0 and math.isnan(mon.estimate().b_simple)


def test_cli_train_without_accumulation_reports_b_simple_with_its_interval(capsys, tmp_path):
    import json

    from batchpilot.cli import main

    torch.set_default_dtype(torch.float32)
    try:
        assert main(["train", "--workload", "mnist1d-cnn", "--batch", "128", "--noise-scale", "--steps", "12",
                     "--threads", "1", "--json"]) == 0
    finally:
        torch.set_default_dtype(torch.float64)
    noise = json.loads(capsys.readouterr().out)["noise_scale"]
    assert noise["source"] == "per-example" and noise["unit"] == "samples" and noise["n_updates"] == 12
    assert 0 < noise["b_simple_low"] <= noise["b_simple"] <= noise["b_simple_high"]
    assert noise["covered_fraction"] == 1.0 and noise["excluded"] == []


def test_trainer_interrupted_and_resumed_gives_the_same_estimates(tmp_path):
    from batchpilot import get_workload
    from batchpilot.train import TrainConfig, Trainer

    torch.set_default_dtype(torch.float32)
    try:
        w = get_workload("mnist1d-mlp", num_train=600, num_val=200)
        cfg = TrainConfig(global_batch=32, steps=8, seed=0)
        full = Trainer(w, cfg, noise=PerExampleNoiseScale())
        full.run()
        first = Trainer(w, cfg, out_dir=tmp_path, noise=PerExampleNoiseScale())
        assert first.run(stop_after=5).steps == 5
        resumed = Trainer(w, cfg, out_dir=tmp_path, resume=True, noise=PerExampleNoiseScale())
        assert resumed.run().steps == 8
        assert resumed.noise.history == full.noise.history and len(full.noise.history) == 8
    finally:
        torch.set_default_dtype(torch.float64)


@pytest.mark.parametrize("case", ["conv-product", "conv-gram", "linear-product", "linear-gram", "embedding"])
def test_chunked_forms_give_the_same_norms(case, monkeypatch):
    """Large layers are split into chunks of examples (bounded memory): same norms with tiny chunks."""
    import batchpilot.noise.layer_rules as lr

    monkeypatch.setattr(lr, "_CHUNK_ELEMS", 40)
    torch.manual_seed(20)
    if case.startswith("conv"):
        make, shape = CONVS[0] if case == "conv-product" else CONVS[-1]
        conv = make()
        with torch.no_grad():
            flat_dim = conv(torch.zeros(1, *shape)).numel()
        check_layer_norms(ConvNet(conv, flat_dim), torch.randn(5, *shape), torch.randint(0, 3, (5,)))
    elif case.startswith("linear"):
        t, d_in, d_hidden = (6, 3, 4) if case == "linear-product" else (2, 16, 24)
        model = SeqModel(d_in, d_hidden)
        check_layer_norms(model, torch.randn(7, t, d_in), torch.randint(0, 5, (7, t)), units_per_example=t)
    else:
        check_layer_norms(TokModel(6, 5), torch.randint(0, 6, (6, 8)), torch.randint(0, 4, (6, 8)), units_per_example=8)


def test_grad_hooks_read_the_batch_gradient_before_the_loop_clips_it():
    """With grad_hooks the batch-gradient norm comes from inside the backward: clipping p.grad after the
    backward (as the Hugging Face Trainer does before its last callback) leaves the estimate unchanged."""
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    plain, hooked = PerExampleNoiseScale(model), PerExampleNoiseScale(model, grad_hooks=True)
    got, want = [], []
    for step in range(4):
        x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
        for k in range(2):  # two micro-batches of 6, each loss mean / 2
            F.cross_entropy(model(x[6 * k:6 * k + 6]), y[6 * k:6 * k + 6]).div(2).backward()
            plain.after_micro(k, 6)
            if k == 1:
                want.append(plain.end_step())
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # the loop clips p.grad
            hooked.after_micro(k, 6)
        got.append(hooked.end_step())
        model.zero_grad()
    assert all(g is not None for g in got)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-10)
    plain.detach()
    hooked.detach()
