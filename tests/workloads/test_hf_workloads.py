"""Trainable Hugging Face workloads from a config and local data (no download); skipped without transformers."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from batchpilot.cli import main  # noqa: E402
from batchpilot.errors import BatchpilotError  # noqa: E402
from batchpilot.memory import with_seq_len  # noqa: E402
from batchpilot.train import TrainConfig, Trainer  # noqa: E402
from batchpilot.workloads import get_workload, list_workloads  # noqa: E402
from batchpilot.workloads.hf import generated_cls_data, hf_workload  # noqa: E402

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "seq_len": 16}
TINY_LLAMA = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64, "seq_len": 16}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_the_hf_workloads_are_listed():
    names = list_workloads()
    for name in ("hf:gpt2", "hf:bert-base", "hf:bert-large", "hf:llama", "hf-tiny-gpt2", "hf-tiny-bert"):
        assert name in names
    assert "memory-only at this size" in names["hf:gpt2"]


def test_full_size_is_memory_only_and_says_how_to_train_it():
    w = get_workload("hf:gpt2")
    assert w.memory_only and w.seq_len == 1024 and w.base_batch == 8
    assert "124.4M params" in w.description and "n_layer=2" in w.description and "hf-tiny-gpt2" in w.description
    with pytest.raises(BatchpilotError, match="memory-only"):
        Trainer(w, TrainConfig(global_batch=2, steps=1))


def test_a_size_option_makes_it_trainable_on_stdlib_bytes():
    w = get_workload("hf:gpt2", **TINY)
    assert not w.memory_only and w.seq_len == 16 and w.metric_name == "val_loss"
    x, y = w.train_data[0]
    assert x.shape == y.shape == (16,) and torch.equal(x[1:], y[:-1])  # next-token targets
    model = w.make_model()
    cfg = model.model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size) == (1, 32, 256)
    # embeddings 256x32 (tied head) + GPT-2's 1024x32 positions + one block (12·32² + 13·32) + final LayerNorm
    assert _params(model) == 256 * 32 + 1024 * 32 + 12 * 32 * 32 + 13 * 32 + 2 * 32
    assert w.count_units(y.unsqueeze(0)) == 16  # tokens are the loss unit


def test_llama_sizes_follow_the_width_and_head_count():
    w = get_workload("hf:llama", **TINY_LLAMA)
    attn = w.make_model().model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 32) and attn.k_proj.weight.shape == (32, 32)  # head_dim 8, 4 kv heads


def test_bad_options_fail_in_one_line(tmp_path):
    with pytest.raises(BatchpilotError, match="unknown option 'n_layers'.*size fields: .*n_layer"):
        get_workload("hf:gpt2", n_layers=2)
    with pytest.raises(BatchpilotError, match="does not build a model"):
        get_workload("hf:gpt2", n_layer=1, n_embd=30, n_head=4)  # 30 is not a multiple of 4 heads
    with pytest.raises(BatchpilotError, match="neither random, stdlib, generated nor an existing file"):
        get_workload("hf:gpt2", data=str(tmp_path / "missing.txt"), **TINY)
    with pytest.raises(BatchpilotError, match="needs head=cls"):
        get_workload("hf:gpt2", data="generated", **TINY)
    with pytest.raises(BatchpilotError, match="seq_len 64 exceeds"):
        get_workload("hf:gpt2", n_positions=32, n_layer=1, n_embd=32, n_head=2, seq_len=64)


def test_a_config_file_and_a_text_file_through_the_shared_loader(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 300,
                               "n_positions": 64}))
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    w = get_workload(f"hf:{cfg}", data=str(text), seq_len=32)
    assert not w.memory_only and w.make_model().model.config.vocab_size == 300  # a config file keeps its vocabulary
    assert len(w.train_data) == (int(len(text.read_bytes()) * 0.9) - 1) // 32
    assert get_workload(f"hf:{cfg}").memory_only  # no data: random tokens


def test_with_seq_len_keeps_the_other_options():
    w = get_workload("hf:gpt2", **TINY)
    w2 = with_seq_len(w, 8)
    assert w2.seq_len == 8 and not w2.memory_only
    assert w2.make_model().model.config.n_embd == 32 and w2.train_data[0][0].shape == (8,)


def test_generated_task_labels_the_majority_marker():
    x, y = generated_cls_data(500, 24, 64, seed=0).tensors
    ones, twos = (x == 1).sum(1), (x == 2).sum(1)
    assert torch.equal((ones > twos).long(), y)
    assert ((ones + twos) % 2 == 1).all() and (x[:, 0] == 3).all()
    assert 0.4 < y.float().mean() < 0.6
    assert torch.equal(generated_cls_data(500, 24, 64, seed=0).tensors[0], x)  # deterministic


def test_one_class_per_file_of_a_directory(tmp_path):
    (tmp_path / "a.txt").write_text("aaaa bbbb " * 100)
    (tmp_path / "b.txt").write_text("zzzz yyyy " * 100)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)  # binary: skipped
    w = get_workload("hf:bert-base", head="cls", data=str(tmp_path), num_hidden_layers=1, hidden_size=32,
                     num_attention_heads=2, intermediate_size=64, seq_len=16)
    labels = w.train_data.tensors[1]
    assert set(labels.tolist()) == {0, 1} and w.metric_name == "val_acc"
    assert w.make_model().model.config.num_labels == 2


def _train(w, steps: int, batch: int):
    return Trainer(w, TrainConfig(global_batch=batch, steps=steps, seed=0, eval_every=steps)).run()


def test_tiny_gpt2_learns_the_stdlib_text():
    w = get_workload("hf-tiny-gpt2", seq_len=32)
    first = _train(w, 1, 16).val_metric
    after = _train(w, 40, 16).val_metric
    assert after < first - 0.5, (first, after)  # byte-level cross-entropy starts near ln(256) = 5.5


def test_tiny_bert_learns_the_generated_task():
    w = get_workload("hf-tiny-bert", seq_len=24, num_train=1024, num_val=256)
    result = _train(w, 120, 32)
    assert result.val_metric > 0.75, result.val_metric


def test_train_cli_runs_an_hf_workload(capsys):
    code = main(["train", "--workload", "hf:llama", *[f"--workload-opt={k}={v}" for k, v in TINY_LLAMA.items()],
                 "--steps", "2", "--batch", "4", "--json", "--threads", "1"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["status"] == "completed" and out["steps"] == 2 and out["workload"] == "hf:llama"


def test_plan_refuses_the_full_size_with_the_way_to_train_it(capsys):
    assert main(["plan", "--workload", "hf:gpt2", "--out", "/nonexistent-dir-is-not-reached"]) == 2
    err = capsys.readouterr().err
    assert "memory-only" in err and "data=stdlib" in err and "batchpilot memory --workload hf:gpt2" in err


@pytest.mark.slow
def test_plan_then_train_the_plan_of_hf_tiny_gpt2(tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["plan", "--workload", "hf-tiny-gpt2", "--json", "--out", str(out), "--threads", "1",
                 "--throughput-budget", "6", "--lr-check-budget", "6", "--probe-budget", "10", "--no-report"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["workload_spec"]["name"] == "hf-tiny-gpt2" and plan["global_batch"] >= 1
    assert main(["train", "--plan", str(out / "plan.json"), "--steps", "3", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["global_batch"] == plan["global_batch"] and run["steps"] == 3


@pytest.mark.slow
def test_sweep_runs_an_hf_workload(tmp_path, capsys):
    code = main(["sweep", "--workload", "hf-tiny-bert", "--workload-opt", "num_train=256", "--workload-opt",
                 "num_val=64", "--workload-opt", "seq_len=16", "--batches", "16,32", "--max-epochs", "1",
                 "--store", str(tmp_path / "s.db"), "--out", str(tmp_path / "sweep"), "--json", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
