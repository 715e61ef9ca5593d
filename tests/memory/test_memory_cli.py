"""``batchpilot memory``: JSON keys, outputs, and the errors the issue asks for."""

from __future__ import annotations

import json

import pytest

from batchpilot.cli import main
from batchpilot.memory.trace import mem_tracker_available

pytestmark = pytest.mark.skipif(not mem_tracker_available(), reason="needs torch MemTracker (torch >= 2.5)")
SMALL = ["--workload", "mnist1d-mlp", "--workload-opt", "num_train=200", "--workload-opt", "num_val=50"]


def test_json_has_the_contract_keys(capsys):
    assert main(["memory", *SMALL, "--device", "RTX 4090", "--json", "--no-what-if", "--batch-sizes", "16,32"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("fixed_bytes", "per_sample_bytes", "peak_bytes_at", "breakdown", "device_memory_bytes",
                "max_micro_batch"):
        assert key in data
    assert data["device_memory_bytes"] == 24564 * 2**20
    assert set(data["peak_bytes_at"]) == {"16", "32"}
    assert data["max_micro_batch"] > 1000
    assert data["options"]["target"] == "cuda"


def test_table_what_ifs_and_outputs(tmp_path, capsys):
    out = tmp_path / "mem"
    assert main(["memory", *SMALL, "--memory", "1GiB", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "largest micro-batch" in text and "checkpointing" in text and "accumulation" in text
    for name in ("memory.json", "memory.png", "memory.html"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "memory.json").read_text())
    assert {s["name"] for s in data["what_if"]} >= {"as configured", "checkpointing", "bf16 autocast"}


def test_unknown_device_lists_known_ones(capsys):
    assert main(["memory", *SMALL, "--device", "H9000"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'H9000'" in err and "H100" in err and "A100-40GB" in err


def test_budget_below_batch_one_peak_names_both_numbers(capsys):
    assert main(["memory", *SMALL, "--device", "cpu", "--memory", "100KiB", "--json", "--no-what-if"]) == 2
    err = capsys.readouterr().err
    assert "below the batch-1 peak" in err
    assert err.count(" B)") >= 2  # both numbers, in bytes


def test_probe_without_cuda_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["memory", *SMALL, "--memory", "1GiB", "--probe", "--no-what-if"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
