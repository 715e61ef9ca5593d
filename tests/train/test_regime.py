"""Fine-tuning regime and regularization hypotheses; the train CLI's large-batch flags end to end."""

import json

import pytest
import torch

from batchpilot import BatchpilotError, get_workload
from batchpilot.cli import main
from batchpilot.errors import EXIT_USAGE
from batchpilot.train.regime import finetune_regime, load_pretrained, regularization_hypotheses
from batchpilot.train import TrainConfig, Trainer


def _run_json(capsys, *argv):
    code = main(["train", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_finetune_regime_is_smaller_and_labelled_a_hypothesis():
    r = finetune_regime(32, 0.05, "sgd")
    assert (r.batch, r.lr_rule) == (8, "linear") and r.lr == pytest.approx(0.05 * 8 / 32 / 10)
    assert r.hypothesis and any("unproven" in line and "docs/large-batch.md" in line for line in r.reasoning)
    adam = finetune_regime(32, 1e-3, "adamw", num_train=20)
    assert adam.batch == 5 and adam.lr == pytest.approx(1e-3 * (5 / 32) ** 0.5 / 10)  # a quarter of 20 samples
    assert finetune_regime(32, 0.05, "sgd", batch=16).lr == pytest.approx(0.05 * 16 / 32 / 10)


def test_regularization_hypotheses_only_with_a_gap():
    assert regularization_hypotheses(0.90, 0.89, higher_is_better=True, batch=512, base_batch=32) == []
    hyps = regularization_hypotheses(0.99, 0.85, higher_is_better=True, batch=512, base_batch=32)
    assert [h.change.split()[0] for h in hyps] == ["weight", "dropout", "label"]
    assert all(h.status.startswith("hypothesis") for h in hyps)
    assert regularization_hypotheses(0.5, 0.9, higher_is_better=False, batch=64, base_batch=32)  # loss-type metric


def test_regularization_hypotheses_word_the_heuristics_as_conditions():
    """The seeds' regularization heuristics are reasons to test, never facts (seeds/README.md #9; docs/claims.md #17, #18)."""
    hyps = regularization_hypotheses(0.99, 0.85, higher_is_better=True, batch=512, base_batch=32)
    wd = hyps[0].rationale
    assert "if small-batch noise regularizes implicitly" in wd and "heuristic" in wd
    text = " ".join(f"{h.change} {h.rationale} {h.test}" for h in hyps)
    assert "∝" not in text and "sqrt" not in text.lower()  # no scaling law offered as a rule


def test_init_from_loads_the_pretrained_weights(mlp_workload, tmp_path):
    pre = Trainer(mlp_workload, TrainConfig(global_batch=32, steps=3), out_dir=tmp_path / "pre")
    pre.run()
    tuned = Trainer(mlp_workload, TrainConfig(global_batch=32, steps=1, lr=0.0, init_from=str(tmp_path / "pre" / "checkpoint.pt")))
    tuned.run()  # LR 0: the weights stay the pretrained ones
    for a, b in zip(pre.model.state_dict().values(), tuned.model.state_dict().values()):
        assert torch.equal(a, b)
    torch.save(pre.model.state_dict(), tmp_path / "weights.pt")
    assert load_pretrained(tmp_path / "weights.pt").keys() == pre.model.state_dict().keys()
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    for bad in ("missing.pt", "junk.pt"):
        with pytest.raises(BatchpilotError, match="pretrained weights"):
            load_pretrained(tmp_path / bad)


def test_cli_finetune(capsys, tmp_path):
    common = ["--workload", "mnist1d-mlp", "--workload-opt", "num_train=600", "--workload-opt", "num_val=100"]
    assert main(["train", *common, "--finetune"]) == EXIT_USAGE
    assert "--init-from" in capsys.readouterr().err
    code, _ = _run_json(capsys, *common, "--steps", "3", "--out", str(tmp_path / "pre"))
    assert code == 0
    code, out = _run_json(capsys, *common, "--steps", "3", "--finetune", "--init-from", str(tmp_path / "pre" / "checkpoint.pt"))
    assert code == 0 and out["global_batch"] == 8 and out["lr"] == pytest.approx(0.05 * 8 / 32 / 10)
    assert out["finetune"]["hypothesis"] is True and len(out["finetune"]["reasoning"]) == 4


def test_cli_adaptive_and_schedule_report_batch_sizes(capsys):
    common = ["--workload", "mnist1d-cnn", "--workload-opt", "num_train=600", "--workload-opt", "num_val=100"]
    code, out = _run_json(capsys, *common, "--adaptive", "--max-batch", "128")
    assert code == 0 and out["batch_mode"] == "adaptive" and out["samples"] == 600
    assert out["batch_sizes"][0] == [1, 32] and all(32 <= b <= 128 for _, b in out["batch_sizes"])
    code, out = _run_json(capsys, *common, "--batch-schedule", "step:end=128,factor=2,every=3")
    assert code == 0 and [b for _, b in out["batch_sizes"]] == [32, 64, 128]
    assert main(["train", *common, "--batch-schedule", "linear:end=64"]) == EXIT_USAGE
    assert "over > 0" in capsys.readouterr().err
    assert main(["train", *common, "--batch-schedule", "linear:end=9999,over=3"]) == EXIT_USAGE
    assert "larger than the training set" in capsys.readouterr().err


def test_cli_lars_and_lamb_train_mnist1d_mlp(capsys):
    for name in ("lars", "lamb"):
        code, out = _run_json(capsys, "--workload", "mnist1d-mlp", "--workload-opt", "num_train=600", "--steps", "40",
                              "--optimizer", name)
        assert code == 0 and out["optimizer"] == name
        assert out["final_train_loss"] is not None and out["final_train_loss"] < 2.3
