"""The Lightning callback: exact noise estimates, logging, plan application, doctor, and no interference."""

from __future__ import annotations

import copy
import csv
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

from batchpilot.errors import BatchpilotError  # noqa: E402
from batchpilot.integrations.lightning import BatchpilotCallback  # noqa: E402
from batchpilot.noise.microbatch import two_batch_estimates  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations" / "lightning.md"


class TinyData(L.LightningDataModule):
    def __init__(self, batch_size: int = 8, n: int = 96, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g, dtype=torch.float64)
        w = torch.randn(6, 3, generator=g, dtype=torch.float64)
        self.y = (self.x @ w + 0.5 * torch.randn(n, 3, generator=g, dtype=torch.float64)).argmax(1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)


class TinyModule(L.LightningModule):
    def __init__(self, lr: float = 0.1, bn: bool = False, warmup_steps: int = 0, fixed_lr: float | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.Tanh(), nn.Linear(16, 3)]
        self.net = nn.Sequential(*layers).double()
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batch_sizes.append(len(x))
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        lr = self.hparams.fixed_lr if self.hparams.fixed_lr is not None else self.hparams.lr
        opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)
        w = self.hparams.warmup_steps
        if not w:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / w))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Recorder(L.Callback):
    """Test-only: the parameters at the start of each optimizer step and the micro-batches of the step."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self._open = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self._open:
            self.steps.append({"params": copy.deepcopy(pl_module.net.state_dict()), "batches": []})
            self._open = True
        self.steps[-1]["batches"].append((batch[0].clone(), batch[1].clone()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._open = False


def fit(module, data, *callbacks, **kw) -> L.Trainer:
    opts = dict(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    opts.update(kw)
    trainer = L.Trainer(callbacks=list(callbacks), **opts)
    trainer.fit(module, datamodule=data)
    return trainer


def expected_pair(step: dict, accumulation: int) -> tuple[float, float]:
    """Reference: each micro-batch's mean gradient by autograd, Lightning's weights 1/k, the two-batch estimators."""
    net = TinyModule().net
    net.load_state_dict(step["params"])
    grads, units = [], []
    for x, y in step["batches"]:
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]).clone())
        units.append(len(x))
    c = [1.0 / accumulation] * len(grads)
    total_c = sum(c)
    big = sum(ci * g for ci, g in zip(c, grads)) / total_c
    b_eff = total_c**2 / sum(ci * ci / b for ci, b in zip(c, units))
    return two_batch_estimates([float(g.square().sum()) for g in grads], float(big.square().sum()), units, b_eff)


@pytest.mark.parametrize("n, k", [(96, 4), (92, 5)])  # (92, 5): a short last window with a ragged micro-batch
def test_noise_matches_a_reference_computed_from_the_micro_batches(n, k):
    rec, cb = Recorder(), BatchpilotCallback(doctor="off")
    fit(TinyModule(), TinyData(n=n), rec, cb, accumulate_grad_batches=k, max_steps=-1, max_epochs=2)
    windows = [s for s in rec.steps if len(s["batches"]) >= 2]
    assert len(cb.history) == len(windows) == cb.monitor.n_updates > 0
    if n == 92:
        assert [len(s["batches"]) for s in rec.steps[:3]] == [5, 5, 2] and len(rec.steps[2]["batches"][-1][0]) == 4
    for got, step in zip(cb.history, windows):
        want = expected_pair(step, k)
        assert got["step_g_sq"] == pytest.approx(want[0], rel=1e-9, abs=1e-12)
        assert got["step_trace_sigma"] == pytest.approx(want[1], rel=1e-9, abs=1e-12)


def test_monitor_leaves_training_bit_identical_and_logs_through_lightning_loggers(tmp_path):
    # clipping runs after the hooks: it must change neither the estimate's inputs nor the training
    plain = TinyModule()
    fit(plain, TinyData(), accumulate_grad_batches=4, gradient_clip_val=0.05)
    watched, cb = TinyModule(), BatchpilotCallback(doctor="off")
    logger = L.loggers.CSVLogger(tmp_path, name="run")
    fit(watched, TinyData(), cb, accumulate_grad_batches=4, logger=logger, log_every_n_steps=1, gradient_clip_val=0.05)
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    assert not cb._grads.installed  # hooks removed at train end
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = [float(r["batchpilot/b_simple"]) for r in rows if r.get("batchpilot/b_simple")]
    assert len(logged) >= 4 and all(math.isfinite(v) for v in logged)
    assert logged[-1] == pytest.approx(cb.estimate().b_simple, rel=1e-6)


def test_every_n_steps_records_only_those_steps():
    cb = BatchpilotCallback(doctor="off", every_n_steps=3)
    fit(TinyModule(), TinyData(), cb, accumulate_grad_batches=4, max_steps=7)
    assert cb.monitor.n_updates == 3 and [h["step"] for h in cb.history] == [0.0, 3.0, 6.0]


def test_without_accumulation_the_micro_batch_monitor_says_why_and_records_nothing():
    cb = BatchpilotCallback(doctor="off", estimator="micro-batch")
    with pytest.warns(UserWarning, match="accumulate_grad_batches >= 2"):
        fit(TinyModule(), TinyData(), cb, max_steps=3)
    assert cb.monitor.n_updates == 0 and not cb.history


PLAN = {"micro_batch_per_rank": 16, "accumulation_steps": 2, "world_size": 1, "global_batch": 32,
        "lr": 0.05, "warmup_steps": 3, "lr_rule": "linear", "base_batch": 8, "base_lr": 0.0125, "caveats": []}


def test_plan_sets_batch_accumulation_lr_and_warmup_before_the_loaders_and_optimizer_exist():
    module, data = TinyModule(lr=0.1, warmup_steps=1), TinyData(batch_size=8)
    cb = BatchpilotCallback(PLAN)
    trainer = fit(module, data, cb, max_steps=4)
    assert data.batch_size == 16 and set(module.batch_sizes) == {16}
    assert trainer.accumulate_grad_batches == 2 and len(module.batch_sizes) == 8  # 4 steps x 2 micro-batches
    assert module.hparams.lr == 0.05 and module.hparams.warmup_steps == 3
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == 0.05
    assert cb.applied == {"batch_size": (8, 16), "lr": (0.1, 0.05), "warmup_steps": (1, 3),
                          "accumulate_grad_batches": (1, 2)}
    assert cb.monitor.n_updates == 4


def test_plan_that_cannot_take_effect_is_refused():
    with pytest.raises(BatchpilotError, match="optimizer's peak LR is 0.3"):
        fit(TinyModule(fixed_lr=0.3), TinyData(), BatchpilotCallback(PLAN), max_steps=1)
    with pytest.raises(BatchpilotError, match="world_size 2"):
        fit(TinyModule(), TinyData(), BatchpilotCallback(dict(PLAN, world_size=2, global_batch=64)), max_steps=1)
    loader = DataLoader(TensorDataset(TinyData().x, TinyData().y), batch_size=8)
    trainer = L.Trainer(callbacks=[BatchpilotCallback(PLAN)], accelerator="cpu", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(BatchpilotError, match="neither the LightningModule, its hparams nor the datamodule has `batch_size`"):
        trainer.fit(TinyModule(), train_dataloaders=loader)
    module = TinyModule()
    module.batch_size = 8  # set, but the loader passed to fit() does not read it
    trainer = L.Trainer(callbacks=[BatchpilotCallback(PLAN)], accelerator="cpu", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(BatchpilotError, match="batch_size 8, the plan micro_batch_per_rank 16"):
        trainer.fit(module, train_dataloaders=loader)
    with pytest.raises(BatchpilotError, match="global_batch 33"):
        BatchpilotCallback(dict(PLAN, global_batch=33))
    with pytest.raises(BatchpilotError, match="doctor must be one of"):
        BatchpilotCallback(doctor="loud")


def test_doctor_reports_batchnorm_under_accumulation_at_train_start():
    cb = BatchpilotCallback()
    with pytest.warns(UserWarning, match=r"BP504 \(warning\)"):
        fit(TinyModule(bn=True), TinyData(), cb, accumulate_grad_batches=4, max_steps=1)
    assert "BP504" in {f.code for f in cb.findings}
    clean = BatchpilotCallback()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(TinyModule(), TinyData(), clean, accumulate_grad_batches=4, max_steps=1)
    assert "BP504" not in {f.code for f in clean.findings}


def test_lightning_batch_size_finder_is_reported_as_max_batch_that_fits():
    cb = BatchpilotCallback(monitor_noise=False)
    finder = L.callbacks.BatchSizeFinder(mode="power", steps_per_trial=1, init_val=8, max_trials=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(TinyModule(), TinyData(), finder, cb, max_steps=1)
    assert "BP102" in {f.code for f in cb.findings}
    data = TinyData()
    with pytest.raises(BatchpilotError, match="the plan micro_batch_per_rank 16"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the finder overrides the plan's micro-batch: refused at train start
        fit(TinyModule(), data, BatchpilotCallback(PLAN), L.callbacks.BatchSizeFinder(
            mode="power", steps_per_trial=1, init_val=2, max_trials=2), max_steps=1)
    assert data.batch_size != 16


def test_doctor_raise_stops_a_fit_with_an_unscaled_lr():
    # batch 32 (8 x 4) at the LR tuned for the micro-batch 8: BP204 (accumulation without rescaling) is an error
    cb = BatchpilotCallback(doctor="raise", doctor_fields={"base_batch": 8, "base_lr": 0.1})
    with pytest.raises(BatchpilotError, match="BP204"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(TinyModule(lr=0.1), TinyData(), cb, accumulate_grad_batches=4, max_steps=1)


def test_docs_example_runs_as_written(tmp_path, monkeypatch):
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/integrations/lightning.md has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_example__"}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)


def test_recorder_weights_give_unbiased_estimates_for_ragged_micro_batches():
    """The effective big batch (Σc)²/Σ(c²/b) makes the two-batch estimators unbiased with Lightning's 1/k weights.

    Fixed weights (no optimizer step), micro-batches of 16, 16 and 2 samples drawn with replacement from a
    population whose |G|² and tr(Σ) are computed exactly from per-sample gradients. The naive big batch
    Σb = 34 (right only for weights proportional to b) must be rejected by the same test.
    """
    from batchpilot.integrations.grads import MicroBatchGradients
    from batchpilot.noise.microbatch import GradientNoiseScale

    g = torch.Generator().manual_seed(3)
    n_pop, d, sizes = 4000, 4, (16, 16, 2)
    x = torch.randn(n_pop, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + torch.randn(n_pop, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    per_sample = (x @ model.weight[0] - y).detach()[:, None] * x  # gradient of 0.5 (x.w - y)^2
    true_g_sq = float(per_sample.mean(0).square().sum())
    true_trace = float(per_sample.var(0, unbiased=False).sum())
    rec = MicroBatchGradients(GradientNoiseScale())
    rec.install(model.parameters())
    k, pairs, naive = len(sizes), [], []
    for _ in range(1500):
        model.zero_grad(set_to_none=True)
        rec.start_step()
        smalls = []
        for b in sizes:
            idx = torch.randint(0, n_pop, (b,), generator=g)
            (0.5 * (model(x[idx])[:, 0] - y[idx]).square().mean() / k).backward()
            rec.end_micro()
            smalls.append(per_sample[idx].mean(0))
        pairs.append(rec.end_step(list(sizes), [1.0 / k] * k))
        big = sum(smalls) / k
        naive.append(two_batch_estimates([float(s.square().sum()) for s in smalls], float(big.square().sum()), list(sizes), sum(sizes)))
    rec.remove()
    for estimates, should_pass in ((pairs, True), (naive, False)):
        t = torch.tensor(estimates, dtype=torch.float64)
        se = t.std(0) / len(t) ** 0.5
        z = ((t.mean(0) - torch.tensor([true_g_sq, true_trace], dtype=torch.float64)) / se).abs()
        assert bool((z < 4).all()) is should_pass, (z, should_pass)


def per_example_reference(step: dict) -> tuple[float, float]:
    """Reference: per-sample gradients by torch.func over the step's examples, one unit each."""
    from torch.func import functional_call, grad, vmap

    net = TinyModule().net
    net.load_state_dict(step["params"])
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.cat([b[0] for b in step["batches"]])
    y = torch.cat([b[1] for b in step["batches"]])

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([v.reshape(len(x), -1) for v in g.values()], 1)
    return two_batch_estimates([float(flat.square().sum(1).mean())], float(flat.mean(0).square().sum()), [1.0], len(x))


@pytest.mark.parametrize("k, estimator", [(1, "auto"), (2, "per-example")])
def test_per_example_estimator_matches_torch_func_with_and_without_accumulation(k, estimator):
    rec, cb = Recorder(), BatchpilotCallback(doctor="off", estimator=estimator)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "monitor is off" warning
        fit(TinyModule(), TinyData(batch_size=8 // k), rec, cb, accumulate_grad_batches=k, max_steps=5)
    assert cb.estimator == estimator and type(cb.monitor).__name__ == "PerExampleNoiseScale"
    assert len(cb.history) == len(rec.steps) == 5
    for got, step in zip(cb.history, rec.steps):
        want = per_example_reference(step)
        assert got["step_g_sq"] == pytest.approx(want[0], rel=1e-7, abs=1e-12)
        assert got["step_trace_sigma"] == pytest.approx(want[1], rel=1e-7, abs=1e-12)
    assert not cb.monitor._handles  # hooks removed at train end


def test_per_example_estimator_leaves_training_bit_identical_and_skips_steps():
    plain = TinyModule()
    fit(plain, TinyData(), max_steps=7, gradient_clip_val=0.05)
    watched, cb = TinyModule(), BatchpilotCallback(doctor="off", every_n_steps=3)
    fit(watched, TinyData(), cb, max_steps=7, gradient_clip_val=0.05)
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    assert [h["step"] for h in cb.history] == [0.0, 3.0, 6.0]
