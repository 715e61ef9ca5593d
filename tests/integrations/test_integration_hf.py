"""The Hugging Face integration: exact noise estimates in the Trainer, plan -> arguments/configs, doctor, refusals."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from batchpilot.errors import BatchpilotError  # noqa: E402
from batchpilot.integrations.hf import (BatchpilotCallback, attach, check_training_arguments,  # noqa: E402
                                        plan_to_accelerate_config, plan_to_accelerator_kwargs,
                                        plan_to_training_arguments, write_accelerate_config)
from batchpilot.noise.microbatch import two_batch_estimates  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations" / "hf.md"
PLAN = {"micro_batch_per_rank": 8, "accumulation_steps": 4, "world_size": 1, "global_batch": 32, "lr": 0.05,
        "warmup_steps": 2, "lr_rule": "sqrt", "base_batch": 16, "base_lr": 0.05 / 2**0.5, "caveats": []}


class Rows(Dataset):
    """``n`` rows of 6 features; ``tokens > 0`` gives each row a sequence with some labels ignored (-100)."""

    def __init__(self, n: int = 92, tokens: int = 0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        shape = (n, tokens, 6) if tokens else (n, 6)
        self.x = torch.randn(*shape, generator=g, dtype=torch.float64)
        self.labels = torch.randint(0, 3, shape[:-1], generator=g)
        if tokens:
            self.labels[torch.rand(shape[:-1], generator=g) < 0.4] = -100

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.labels[i]}


class MeanLossNet(nn.Module):
    """Mean loss per micro-batch: the Trainer divides it by the micro-batches of the step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits.flatten(0, -2), labels.flatten()), "logits": logits}


class TokenSumNet(MeanLossNet):
    """Accepts loss kwargs: summed token loss over the Trainer's ``num_items_in_batch`` (HF's GA-correct path)."""

    def forward(self, x, labels=None, num_items_in_batch=None, **kwargs):
        logits = self.net(x)
        total = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum")
        return {"loss": total / num_items_in_batch, "logits": logits}


class MeanLossKwargsNet(MeanLossNet):
    """Takes ``**kwargs`` but ignores ``num_items_in_batch`` (huggingface/transformers#47688): the Trainer then
    neither divides by the accumulation nor gets a loss divided by N, so the gradient is k x the batch mean."""

    def forward(self, x, labels=None, **kwargs):
        return super().forward(x, labels)


class Recorder(TrainerCallback):
    """Test-only: parameters at each step start and the inputs of each training forward."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self._handle = None

    def on_train_begin(self, args, state, control, model=None, **kw):
        self._handle = model.register_forward_pre_hook(self._fwd, with_kwargs=True)

    def _fwd(self, module, a, kw):
        if module.training and self.steps:
            self.steps[-1]["inputs"].append({k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)})

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.steps.append({"params": copy.deepcopy(model.state_dict()), "inputs": []})

    def on_train_end(self, args, state, control, **kw):
        self._handle.remove()


def args_for(tmp_path, **kw) -> TrainingArguments:
    opts = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=5,
                num_train_epochs=2, learning_rate=0.05, use_cpu=True, report_to="none", save_strategy="no",
                logging_steps=1, disable_tqdm=True, max_grad_norm=0.05, seed=0)
    opts.update(kw)
    return TrainingArguments(**opts)


def expected_pair(model_cls, step: dict) -> tuple[float, float]:
    """Reference: per-micro-batch mean gradients by autograd, the Trainer's weights, the two-batch estimators."""
    model = model_cls()
    model.load_state_dict(step["params"])
    grads, units = [], []
    for inputs in step["inputs"]:
        model.zero_grad()
        logits = model.net(inputs["x"])
        labels = inputs["labels"]
        F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100).backward()  # mean over valid units
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
        units.append(int(labels.ne(-100).sum()))
    if model_cls is TokenSumNet:
        c = [u / sum(units) for u in units]  # sum / N, N = the step's valid labels
    elif model_cls is MeanLossKwargsNet:
        c = [1.0] * len(grads)  # the trap: nothing divides the micro-batch means
    else:
        c = [1.0 / len(grads)] * len(grads)
    big = sum(ci * g for ci, g in zip(c, grads)) / sum(c)
    b_eff = sum(c) ** 2 / sum(ci * ci / b for ci, b in zip(c, units))
    return two_batch_estimates([float(g.square().sum()) for g in grads], float(big.square().sum()), units, b_eff)


@pytest.mark.parametrize("model_cls, tokens", [(MeanLossNet, 0), (TokenSumNet, 5), (MeanLossKwargsNet, 0)])
def test_noise_matches_a_reference_from_the_micro_batches_despite_clipping(tmp_path, model_cls, tokens):
    rec, cb = Recorder(), BatchpilotCallback(doctor="off")
    trainer = Trainer(model=model_cls(), args=args_for(tmp_path), train_dataset=Rows(tokens=tokens), callbacks=[rec, cb])
    trainer.train()
    # 92 rows, batch 8 -> 12 micro-batches per epoch in windows of 5, 5, 2; the last micro-batch has 4 rows
    assert [len(s["inputs"]) for s in rec.steps[:3]] == [5, 5, 2] and len(rec.steps[2]["inputs"][-1]["x"]) == 4
    assert len(cb.history) == len(rec.steps) == cb.monitor.n_updates == 6
    for got, step in zip(cb.history, rec.steps):
        want = expected_pair(model_cls, step)
        assert got["step_g_sq"] == pytest.approx(want[0], rel=1e-9, abs=1e-12)
        assert got["step_trace_sigma"] == pytest.approx(want[1], rel=1e-9, abs=1e-12)
    assert cb.loss_ignores_num_items is {MeanLossNet: None, TokenSumNet: False, MeanLossKwargsNet: True}[model_cls]


def test_a_loss_not_normalised_for_accumulation_is_reported_and_can_stop_training(tmp_path):
    cb = BatchpilotCallback()
    with pytest.warns(UserWarning, match=r"BP105 \(warning\).*gradient is 5x the batch mean"):
        Trainer(model=MeanLossKwargsNet(), args=args_for(tmp_path, max_steps=1), train_dataset=Rows(), callbacks=[cb]).train()
    assert "BP105" in {f.code for f in cb.findings}
    model = MeanLossKwargsNet()
    before = copy.deepcopy(model.state_dict())
    stop = BatchpilotCallback(doctor="raise")
    trainer = Trainer(model=model, args=args_for(tmp_path, optim="sgd", max_steps=1), train_dataset=Rows(), callbacks=[stop])
    with pytest.raises(BatchpilotError, match="BP105"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()  # with SGD the effective LR is 5x: an error, raised at the first forward
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not stop._grads.installed and stop._fwd_handle is None


class Reporter(TrainerCallback):
    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.seen.append(dict(logs))


@pytest.mark.parametrize("model_cls, tokens", [(MeanLossNet, 0), (TokenSumNet, 5)])  # TokenSumNet: the probe runs
def test_callback_leaves_training_bit_identical_and_reaches_reporters_when_attached(tmp_path, model_cls, tokens):
    plain = model_cls()
    Trainer(model=plain, args=args_for(tmp_path / "a"), train_dataset=Rows(tokens=tokens)).train()
    watched, reporter = model_cls(), Reporter()
    trainer = Trainer(model=watched, args=args_for(tmp_path / "b"), train_dataset=Rows(tokens=tokens), callbacks=[reporter])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cb = attach(trainer)
        trainer.train()
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    logged = [r for r in reporter.seen if "batchpilot/trace_sigma" in r]  # b_simple is left out while it is inf
    assert len(logged) == 6 and logged[-1]["batchpilot/trace_sigma"] == pytest.approx(cb.estimate().trace_sigma)
    assert logged[-1]["batchpilot/b_simple"] == pytest.approx(cb.estimate().b_simple)
    assert any("batchpilot/b_simple" in r for r in trainer.state.log_history)
    assert not cb._grads.installed and cb._fwd_handle is None


def test_plan_to_training_arguments_sets_the_four_numbers_and_checks_the_global_batch(tmp_path):
    args = plan_to_training_arguments(PLAN, output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.learning_rate, args.warmup_steps) == (8, 4, 0.05, 2)
    assert check_training_arguments(args, PLAN) == 32
    with pytest.raises(BatchpilotError, match="auto_find_batch_size=True is refused"):
        plan_to_training_arguments(PLAN, output_dir=str(tmp_path), auto_find_batch_size=True)
    with pytest.raises(BatchpilotError, match="per_device_train_batch_size=16 contradicts the plan's 8"):
        plan_to_training_arguments(PLAN, output_dir=str(tmp_path), per_device_train_batch_size=16)
    big = dict(PLAN, world_size=4, global_batch=128)
    with pytest.raises(BatchpilotError, match="world_size 4 but this process sees 1"):
        plan_to_training_arguments(big, output_dir=str(tmp_path), use_cpu=True)
    outside = plan_to_training_arguments(big, check_world_size=False, output_dir=str(tmp_path), use_cpu=True)
    assert outside.per_device_train_batch_size == 8
    with pytest.raises(BatchpilotError, match="global_batch 30 != micro_batch_per_rank 8"):
        plan_to_training_arguments(dict(PLAN, global_batch=30), output_dir=str(tmp_path))


def test_trainer_refuses_auto_find_batch_size_and_arguments_off_the_plan(tmp_path):
    auto = Trainer(model=MeanLossNet(), args=args_for(tmp_path, auto_find_batch_size=True), train_dataset=Rows(),
                   callbacks=[BatchpilotCallback(doctor="off")])
    with pytest.raises(BatchpilotError, match="halves per_device_train_batch_size"):
        auto.train()
    off_plan = Trainer(model=MeanLossNet(), args=args_for(tmp_path), train_dataset=Rows(),
                       callbacks=[BatchpilotCallback(PLAN, doctor="off")])  # accumulation 5, plan 4
    with pytest.raises(BatchpilotError, match="gradient_accumulation_steps is 5, the plan's accumulation_steps 4"):
        off_plan.train()


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(cfg)


class Tokens(Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 40, (n, 8), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_tiny_bert_from_a_config_gets_the_doctor_and_the_monitor(tmp_path):
    args = plan_to_training_arguments(PLAN, output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=4,
                                      save_strategy="no", disable_tqdm=True, logging_steps=2)
    cb = BatchpilotCallback(PLAN)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        Trainer(model=tiny_bert(), args=args, train_dataset=Tokens(), callbacks=[cb]).train()
    codes = {f.code: f.severity for f in cb.findings}  # it saw LayerNorm, AdamW, warmup 2 and micro-batch 8 x 4
    assert codes.get("BP401") == "warning" and "error" not in codes.values() and "BP101" not in codes
    # transformers 5.23's BertForSequenceClassification takes **kwargs but ignores num_items_in_batch (#47688)
    assert codes.get("BP105") == ("warning" if cb.loss_ignores_num_items else None)
    assert cb.monitor.n_updates == 4 and cb.history[-1]["n_updates"] == 4.0
    # an unscaled LR with accumulation is an error finding: doctor="raise" stops before the first step
    stop = BatchpilotCallback(doctor="raise", doctor_fields={"base_batch": 8, "base_lr": 0.05})
    with pytest.raises(BatchpilotError, match="BP204"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=tiny_bert(), args=args, train_dataset=Tokens(), callbacks=[stop]).train()


def test_accelerate_config_loads_with_accelerates_own_reader(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    plan = dict(PLAN, world_size=4, global_batch=128)
    path = write_accelerate_config(plan, tmp_path / "accelerate.yaml", num_machines=2)
    cfg = load_config_from_file(str(path))
    assert (cfg.num_processes, cfg.num_machines, str(cfg.distributed_type)) == (4, 2, "DistributedType.MULTI_GPU")
    single = plan_to_accelerate_config(PLAN, use_cpu=True)
    assert single["distributed_type"] == "NO" and single["num_processes"] == 1
    assert plan_to_accelerator_kwargs(PLAN) == {"gradient_accumulation_steps": 4}
    with pytest.raises(BatchpilotError, match="divisor"):
        plan_to_accelerate_config(plan, num_machines=3)


def test_docs_example_runs_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/integrations/hf.md has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(DOC), "exec"), {"__name__": "__doc_example__"})


def per_example_reference(model_cls, step: dict, k: int) -> tuple[float, float]:
    """Reference: per-sample gradients by torch.func; units per example (its valid labels), the loss
    weights the Trainer uses (sum over N with num_items_in_batch, else the micro-batch mean over k)."""
    from torch.func import functional_call, grad, vmap

    model = model_cls()
    model.load_state_dict(step["params"])
    net = model.net
    params = {n: p.detach() for n, p in net.named_parameters()}

    def loss(p, xi, yi):  # the example's mean over its valid units
        logits = functional_call(net, p, (xi[None],))
        return F.cross_entropy(logits.flatten(0, -2), yi[None].flatten(), ignore_index=-100)

    xs = torch.cat([i["x"] for i in step["inputs"]])
    ys = torch.cat([i["labels"] for i in step["inputs"]])
    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    flat = torch.cat([v.reshape(len(xs), -1) for v in g.values()], 1).double()
    u = ys.reshape(len(ys), -1).ne(-100).sum(1).double()
    if model_cls is TokenSumNet:  # the step's gradient: Σ u_i g_i / U
        big_g = (u[:, None] * flat).sum(0) / u.sum()
    else:  # equal micro-batches of equal units: the mean of the example means
        big_g = flat.mean(0)
    inv = float((1.0 / u).mean())
    return two_batch_estimates([float(flat.square().sum(1).mean())], float(big_g.square().sum()), [1.0 / inv],
                               float(u.sum()))


@pytest.mark.parametrize("model_cls, tokens, k", [(MeanLossNet, 0, 1), (TokenSumNet, 5, 1), (TokenSumNet, 5, 2),
                                                  (MeanLossNet, 0, 2)])
def test_per_example_estimator_matches_torch_func_despite_clipping(tmp_path, model_cls, tokens, k):
    rec = Recorder()
    cb = BatchpilotCallback(doctor="off", estimator="auto" if k == 1 else "per-example")
    data = Rows(n=96, tokens=tokens)
    if tokens:  # every example keeps a label (an example without any has no units to divide by)
        data.labels[:, 0] = data.labels[:, 0].clamp(min=0)
    trainer = Trainer(model=model_cls(), args=args_for(tmp_path, gradient_accumulation_steps=k, num_train_epochs=1),
                      train_dataset=data, callbacks=[rec, cb])
    trainer.train()
    assert type(cb.monitor).__name__ == "PerExampleNoiseScale" and cb.history
    assert len(cb.history) == len(rec.steps)
    for got, step in zip(cb.history, rec.steps):
        want = per_example_reference(model_cls, step, k)
        assert got["step_g_sq"] == pytest.approx(want[0], rel=1e-5, abs=1e-10)
        assert got["step_trace_sigma"] == pytest.approx(want[1], rel=1e-5, abs=1e-10)
