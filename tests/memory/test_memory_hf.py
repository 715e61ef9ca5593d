"""Memory-only transformers architectures built from configs (no download); skipped without transformers."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from batchpilot.errors import BatchpilotError  # noqa: E402
from batchpilot.memory import memory_curve  # noqa: E402
from batchpilot.memory.hf import hf_workload, load_hf_workload  # noqa: E402
from batchpilot.memory.trace import trace_step  # noqa: E402
from batchpilot.workloads import get_workload  # noqa: E402

TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 512, "n_positions": 128}
TINY_BERT = {"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
             "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 128}


def _config(tmp_path, data, name):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_builtin_names_are_registered_without_building_a_model():
    w = get_workload("hf:gpt2")
    assert w.seq_len == 1024 and w.base_batch == 8
    assert get_workload("hf:bert-base").seq_len == 512
    assert get_workload("hf:bert-large", head="lm").name == "hf:bert-large[lm]"


def test_tiny_gpt2_from_config_traces_and_counts_its_parameters(tmp_path):
    w = load_hf_workload("hf:" + _config(tmp_path, TINY_GPT2, "gpt2.json"), seq_len=64)
    model = w.make_model()
    param_bytes = sum(p.numel() * 4 for p in model.parameters())  # tied LM head counted once
    t = trace_step(w, 4)
    assert t.breakdown["params"] == param_bytes
    assert t.phase_end_breakdown["step2.optimizer"]["optimizer_state"] >= 2 * param_bytes


def test_tiny_bert_cls_and_cuda_target(tmp_path):
    w = hf_workload(_config(tmp_path, TINY_BERT, "bert.json"), head="cls", seq_len=128)
    cpu = memory_curve(w, batch_sizes=[2, 4])
    cuda = memory_curve(w, batch_sizes=[2, 4], device="cuda")
    # dropout pushes CPU attention onto the O(s^2) math path; CUDA's flash kernel is O(s)
    assert cuda.per_sample_bytes < cpu.per_sample_bytes


def test_bad_hf_specs(tmp_path):
    with pytest.raises(BatchpilotError):
        load_hf_workload("hf:")
    with pytest.raises(BatchpilotError, match="neither"):
        hf_workload(str(tmp_path / "missing.json"))
    with pytest.raises(BatchpilotError, match="head"):
        hf_workload(_config(tmp_path, TINY_GPT2, "g.json"), head="seq2seq")
    with pytest.raises(BatchpilotError, match="exceeds"):
        hf_workload(_config(tmp_path, TINY_GPT2, "g2.json"), seq_len=4096)


@pytest.mark.slow
def test_gpt2_small_has_124m_parameters_and_a_huge_activation_share():
    t = trace_step(get_workload("hf:gpt2"), 8, target="cuda")
    assert 124_000_000 * 4 < t.breakdown["params"] < 125_000_000 * 4
    assert t.peak_bytes > 10 * 2**30  # a weights-only estimate says ~2 GiB


def test_seq_len_rebuilds_a_config_file_workload_with_its_options(tmp_path):
    w = load_hf_workload("hf:" + _config(tmp_path, TINY_BERT, "bert.json"), head="lm", seq_len=32)
    curve = memory_curve(w, batch_sizes=[2, 4], seq_len=96)
    assert curve.seq_len == 96
    short = memory_curve(w, batch_sizes=[2, 4])
    assert curve.per_sample_bytes > 2.5 * short.per_sample_bytes  # 3x the tokens per sample, still the lm head


def test_memory_cli_seq_len_for_a_config_file(tmp_path, capsys):
    """The issue's failing command: `batchpilot memory --workload hf:llama.json --seq-len N --device H100`."""
    from batchpilot.cli import main

    llama = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 256}
    path = _config(tmp_path, llama, "llama.json")
    code = main(["memory", "--workload", f"hf:{path}", "--seq-len", "200", "--device", "H100", "--no-what-if",
                 "--batch-sizes", "1,4", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["seq_len"] == 200 and out["max_micro_batch"] > 0
    assert main(["memory", "--workload", f"hf:{path}", "--seq-len", "300", "--json"]) == 2
    assert "exceeds the config's maximum positions 256" in capsys.readouterr().out


def test_memory_cli_seq_len_for_a_sized_builtin(capsys):
    from batchpilot.cli import main

    code = main(["memory", "--workload", "hf:gpt2", "--workload-opt", "n_layer=1", "--workload-opt", "n_embd=32",
                 "--workload-opt", "n_head=2", "--seq-len", "48", "--batch-sizes", "1,4", "--no-what-if", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["seq_len"] == 48 and out["workload"] == "hf:gpt2"
