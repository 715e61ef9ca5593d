"""The per-example monitor's fused mode (``fused=True``) against torch.func per-sample gradients and
against the unfused monitor: same norms, same estimates, gradients equal up to rounding, outputs
bit-identical, the model's forwards restored on detach."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchpilot.errors import BatchpilotError
from batchpilot.noise.fused_layers import per_example_linear_grads
from batchpilot.noise.layer_rules import _gram_is_cheaper
from batchpilot.noise.per_example import PerExampleNoiseScale
from noise_reference import per_sample_grads  # tests/noise/noise_reference.py


@pytest.fixture(autouse=True)
def _float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def per_sample_sq(model: nn.Module, loss_i, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example squared gradient norm per module (over its own parameters), by torch.func."""
    g = per_sample_grads(model, loss_i, x, y)
    out: dict[str, torch.Tensor] = {}
    for k, v in g.items():
        mod = k.rsplit(".", 1)[0] if "." in k else ""
        out[mod] = out.get(mod, 0) + v.reshape(v.shape[0], -1).square().sum(1)
    return out


def ce_sum(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


class Conv1D(nn.Module):
    """transformers' Conv1D (weight ``(in, out)``), as in test_per_example."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class SeqModel(nn.Module):
    def __init__(self, d_in: int = 3, d_hidden: int = 4, vocab: int = 5, conv1d: bool = False) -> None:
        super().__init__()
        self.inp = Conv1D(d_hidden, d_in) if conv1d else nn.Linear(d_in, d_hidden)
        self.ln = nn.LayerNorm(d_hidden)
        self.mid = nn.Linear(d_hidden, d_hidden)
        self.out = nn.Linear(d_hidden, vocab, bias=False)

    def forward(self, x):
        return self.out(self.ln(torch.tanh(self.mid(torch.tanh(self.inp(x))))))


def _step(model, mon, x, y, total):
    out = model(x)
    (ce_sum(out, y) / total).backward()
    res = mon.observe(units=total) if mon is not None else None
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads, res


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_norms_match_torch_func_and_the_unfused_monitor(conv1d, dtype):
    torch.manual_seed(0)
    assert not _gram_is_cheaper(6, 3, 4)  # the sizes the fused mode takes
    model = SeqModel(conv1d=conv1d).to(dtype)
    plain = copy.deepcopy(model)
    x, y = torch.randn(7, 6, 3, dtype=dtype), torch.randint(0, 5, (7, 6))
    total = 7 * 6
    mon = PerExampleNoiseScale(model, fused=True)
    ref_mon = PerExampleNoiseScale(plain)
    assert set(mon._fused_modules) == {model.inp, model.mid, model.out}
    for _ in range(2):  # the checking step, then an ordinary one
        out, grads, got = _step(model, mon, x, y, total)
        out0, grads0, want = _step(plain, ref_mon, x, y, total)
        assert torch.equal(out, out0)  # the forward is the layer's own op
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for k in grads0:
            assert torch.allclose(grads[k], grads0[k], rtol=tol, atol=tol * float(grads0[k].abs().max())), k
        assert got == pytest.approx(want, rel=1e-9 if dtype == torch.float64 else 1e-4)
    assert mon.fallback_layers() == ()
    ref = per_sample_sq(plain.double(), ce_sum, x.double(), y)
    for name, sq in mon.last_norms.items():
        torch.testing.assert_close(sq.double(), ref[name] / total**2, rtol=1e-9 if dtype == torch.float64 else 1e-4,
                                   atol=0)


def test_the_backward_runs_through_the_fused_function_only_while_active():
    torch.manual_seed(1)
    model = SeqModel()
    x = torch.randn(4, 6, 3)
    mon = PerExampleNoiseScale(model, fused=True)
    seen = []
    model.mid.register_forward_hook(lambda m, i, o: seen.append(type(o.grad_fn).__name__))
    model(x)
    mon.after_micro(0)
    mon.active = False
    model(x)
    with torch.no_grad():
        model(x)
    mon.active = True
    model(x[:, 0])  # (N, d): the hooks' |x|²|δ|² rule, not the fused function
    assert seen[0] == "_FusedLinearBackward" and seen[1] != "_FusedLinearBackward" and seen[2] == "NoneType"
    assert seen[3] != "_FusedLinearBackward"


def test_detach_restores_the_forwards_and_the_state_dict_is_unchanged():
    torch.manual_seed(2)
    model = SeqModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patched = model.mid.forward  # an instance attribute set by someone else stays theirs
    model.mid.forward = lambda x: nn.Linear.forward(model.mid, x)
    theirs = model.mid.forward
    mon = PerExampleNoiseScale(model, fused=True)
    assert "forward" in model.inp.__dict__
    assert list(model.state_dict()) == list(before)
    (ce_sum(model(torch.randn(3, 6, 3)), torch.randint(0, 5, (3, 6))) / 18).backward()
    mon.observe()
    mon.detach()
    assert "forward" not in model.inp.__dict__ and "forward" not in model.out.__dict__
    assert model.mid.forward is theirs and patched is not theirs
    assert not any(k.startswith("_batchpilot") for m in model.modules() for k in m.__dict__)
    assert set(model.state_dict()) == set(before)
    mon.attach(model)  # and again
    assert "forward" in model.inp.__dict__
    mon.detach()
    assert "forward" not in model.inp.__dict__


class TiedLM(nn.Module):
    def __init__(self, vocab=7, dim=6, seq=5) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.ln = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        h = h + self.mix(self.ln(h))
        h = h * (1 + self.mix.weight[0])  # mix.weight also used outside its call
        return self.head(h) + h @ self.tok.weight.T  # and a tied embedding/head


def test_the_check_and_fallback_still_work_fused():
    torch.manual_seed(3)
    model = TiedLM()
    plain = copy.deepcopy(model)
    idx, y = torch.randint(0, 7, (8, 5)), torch.randint(0, 7, (8, 5))
    mon, ref = PerExampleNoiseScale(model, fused=True), PerExampleNoiseScale(plain)
    for _ in range(2):
        _, grads, got = _step(model, mon, idx, y, 40)
        _, grads0, want = _step(plain, ref, idx, y, 40)
        assert got == pytest.approx(want, rel=1e-9)
        for k in grads0:
            torch.testing.assert_close(grads[k], grads0[k])
    fb = dict(s.split(": ", 1) for s in mon.fallback_layers())
    assert set(fb) == {"tok", "pos", "mix"} and "outside this call" in fb["mix"]
    assert set(mon.last_norms) == {"ln", "head"}


def test_a_layer_called_twice_falls_back_fused():
    torch.manual_seed(4)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    plain = copy.deepcopy(model)
    x = torch.randn(6, 3, 4)
    mon = PerExampleNoiseScale(model, fused=True)
    F.mse_loss(model(x), torch.zeros(6, 3, 4)).backward()
    F.mse_loss(plain(x), torch.zeros(6, 3, 4)).backward()
    assert mon.observe() is None
    assert mon.fallback_layers() == ("0: Linear called 2 times in one forward",)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_accumulation_and_a_subset_of_examples_give_the_unfused_estimates():
    torch.manual_seed(5)
    model = SeqModel()
    plain = copy.deepcopy(model)
    x, y = torch.randn(10, 6, 3), torch.randint(0, 5, (10, 6))
    for kwargs in ({}, {"max_examples": 3}):
        mons = [PerExampleNoiseScale(model, fused=True, **kwargs), PerExampleNoiseScale(plain, **kwargs)]
        results = []
        for m, mon in zip((model, plain), mons):
            for _ in range(2):
                for i, part in enumerate((slice(0, 4), slice(4, 10))):
                    (ce_sum(m(x[part]), y[part]) / 60).backward()
                    mon.after_micro(i, 6 * (part.stop - part.start))
                got = mon.end_step()
                m.zero_grad(set_to_none=True)
            results.append((got, {k: v.clone() for k, v in mon.last_norms.items()}))
            mon.detach()
        (got, norms), (want, norms0) = results
        assert got == pytest.approx(want, rel=1e-9)
        for k in norms0:
            torch.testing.assert_close(norms[k], norms0[k])
        if kwargs:
            assert all(v.shape == (3,) for v in norms.values())


def test_per_example_linear_grads_subset_and_chunks(monkeypatch):
    torch.manual_seed(6)
    x, d = torch.randn(9, 4, 5), torch.randn(9, 4, 3)
    gw, gb, sq = per_example_linear_grads(x, d, False, 9)
    per_w = torch.einsum("ntb,nta->nba", d, x)
    torch.testing.assert_close(gw, per_w.sum(0))
    torch.testing.assert_close(gb, d.sum((0, 1)))
    torch.testing.assert_close(sq, per_w.square().sum((1, 2)) + d.sum(1).square().sum(1))
    monkeypatch.setattr("batchpilot.noise.layer_rules._CHUNK_ELEMS", 40)  # 2 examples a chunk
    gw2, gb2, sq2 = per_example_linear_grads(x, d, False, 7)
    torch.testing.assert_close(gw2, gw)
    torch.testing.assert_close(sq2, sq[:7])
    gw3, gb3, sq3 = per_example_linear_grads(x.transpose(-1, -1), d, True, 9, want_b=False)
    torch.testing.assert_close(gw3, gw.T)
    assert gb3 is None
    torch.testing.assert_close(sq3, per_w.square().sum((1, 2)))


def test_fused_with_the_cheap_layers_is_refused():
    with pytest.raises(BatchpilotError, match="cheap"):
        PerExampleNoiseScale(SeqModel(), fused=True, layers="cheap")


def test_two_fused_monitors_detach_in_any_order_and_a_deepcopy_runs_plain():
    torch.manual_seed(7)
    model = SeqModel()
    plain = copy.deepcopy(model)
    x, y = torch.randn(5, 6, 3), torch.randint(0, 5, (5, 6))
    first, second = PerExampleNoiseScale(model, fused=True), PerExampleNoiseScale(model, fused=True)
    ref = PerExampleNoiseScale(plain)
    (ce_sum(model(x), y) / 30).backward()
    got = first.observe(units=30), second.observe(units=30)
    _, _, want = _step(plain, ref, x, y, 30)
    assert got[0] == pytest.approx(want, rel=1e-9) and got[1] == pytest.approx(want, rel=1e-9)
    model.zero_grad(set_to_none=True)
    clone = copy.deepcopy(model)  # e.g. an EMA copy: no monitor comes along
    assert type(clone.inp.forward).__name__ == "method" and clone.inp.forward.__self__ is clone.inp
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))
    first.detach()  # the inner one first: the outer one keeps working
    assert "forward" in model.inp.__dict__
    (ce_sum(model(x), y) / 30).backward()
    assert second.observe(units=30) == pytest.approx(want, rel=1e-9) and first.n_updates == 1
    second.detach()
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_bfloat16_fused_norms_are_close_to_the_hooks():
    torch.manual_seed(8)
    model = SeqModel(d_in=16, d_hidden=32).to(torch.bfloat16)
    plain = copy.deepcopy(model)
    x, y = torch.randn(6, 40, 16, dtype=torch.bfloat16), torch.randint(0, 5, (6, 40))
    mon, ref = PerExampleNoiseScale(model, fused=True), PerExampleNoiseScale(plain)
    for m, mo in ((model, mon), (plain, ref)):
        (ce_sum(m(x).float(), y) / 240).backward()
        mo.observe(units=240)
    assert mon.fallback_layers() == () and set(mon.last_norms) == set(ref.last_norms)
    for k, v in ref.last_norms.items():
        torch.testing.assert_close(mon.last_norms[k], v, rtol=0.05, atol=0)
    for p, q in zip(model.parameters(), plain.parameters()):
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad.float(), q.grad.float(), rtol=0.05, atol=0.02 * float(q.grad.abs().max()))


def test_cli_train_noise_fused(capsys):
    import json

    from batchpilot.cli import main

    torch.set_default_dtype(torch.float32)
    assert main(["train", "--workload", "charlm", "--batch", "8", "--noise-scale", "--noise-fused", "--steps", "3",
                 "--threads", "1", "--json"]) == 0
    noise = json.loads(capsys.readouterr().out)["noise_scale"]
    assert noise["source"] == "per-example" and noise["n_updates"] == 3
    assert main(["train", "--workload", "charlm", "--batch", "8", "--noise-fused", "--steps", "1"]) != 0
    assert "--noise-fused needs --noise-scale" in capsys.readouterr().err


def test_transformers_conv1d_output_is_bit_identical():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(9)
    layer = pytorch_utils.Conv1D(12, 8).float()
    x = torch.randn(3, 7, 8, dtype=torch.float32)
    ref = layer(x)
    mon = PerExampleNoiseScale(nn.Sequential(layer), fused=True)
    out = mon._model(x)
    assert type(out.grad_fn).__name__ == "_FusedLinearBackward"
    assert torch.equal(out, ref)
    mon.detach()


def test_non_reentrant_checkpointing_runs_and_the_layer_falls_back_as_called_twice():
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(checkpoint(lambda h: torch.tanh(self.a(h)), x, use_reentrant=False))

    torch.manual_seed(10)
    model = Ckpt()
    plain = copy.deepcopy(model)
    ref = PerExampleNoiseScale(plain)
    mon = PerExampleNoiseScale(model, fused=True)
    x = torch.randn(5, 6, 4)
    for _ in range(2):  # the first step finds the recomputed layer; the second runs it unfused
        for m, mo in ((model, mon), (plain, ref)):
            F.mse_loss(m(x), torch.zeros(5, 6, 3)).backward()
            mo.observe()
        for p, q in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        model.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        assert mon.fallback_layers() == ref.fallback_layers() == ("a: Linear called 2 times in one forward",)
    assert len(mon.history) == 2
    for got, want in zip(mon.history, ref.history):
        assert got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("fused", [False, True])
def test_torch_save_of_a_monitored_model_saves_the_model_not_the_monitor(fused, tmp_path):
    """``torch.save(model)`` with the monitor attached (hooks, a fused forward, gradient hooks) works; the
    loaded copy computes the same outputs and runs without the monitor (its hooks are inert), and the
    monitored model goes on being monitored."""
    import torch
    from torch import nn

    from batchpilot.noise.per_example import PerExampleNoiseScale

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    mon = PerExampleNoiseScale(model, fused=fused, grad_hooks=True)
    x = torch.randn(4, 5, 8)
    model(x).sum().backward()
    mon.observe()
    torch.save(model, tmp_path / "model.pt")
    copy = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(copy(x), model(x))
    seen = mon.n_updates
    copy.zero_grad()
    copy(x).sum().backward()  # the copy's hooks do nothing: no update, no error
    assert mon.n_updates == seen and all(p.grad is not None for p in copy.parameters())
    model.zero_grad()
    model(x).sum().backward()
    mon.observe()
    assert mon.n_updates == seen + 1
    mon.detach()
    assert "forward" not in model[0].__dict__ and not model[0]._forward_hooks
