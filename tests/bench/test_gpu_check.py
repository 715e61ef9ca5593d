"""bench/gpu_check.py: refuses to run without CUDA unless --dry-run (fast), and --dry-run end to end on CPU (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_without_cuda_it_asks_for_dry_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    proc = _run("--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bad_section_is_refused(tmp_path):
    proc = _run("--dry-run", "--sections", "memory,gpus", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "unknown section" in proc.stderr


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    proc = _run("--dry-run", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] and result["skipped"] == []
    for section in ("memory", "step", "probe"):
        rows = result[section]
        assert rows and all("error" not in r for r in rows), rows
    # on CPU the trace and the allocator's events agree closely (docs/memory.md); the code path is what is checked
    assert all(abs(r["error_frac"]) < 0.08 for r in result["memory"])
    assert {r["precision"] for r in result["memory"]} == {"fp32", "bf16 autocast"}
    assert all(r["predicted_s"] > 0 and r["measured_median_s"] > 0 for r in result["step"])
    probe = result["probe"][0]
    assert probe["true_max"] == probe["simulated_true_max"] and probe["probe_ooms"] <= 1
    assert probe["predicted_max"] <= probe["true_max"]
    assert "overhead_median_paired" in result["noise"] and result["noise"]["b_simple"] == result["noise"]["b_simple"]
    plan = result["plan"]
    assert plan["exit_code"] == 0 and plan["points"] and plan["global_batch"] >= 1
    assert set(result["summary"]) >= {"memory_target_met", "step_target_met", "noise_target_met", "plan_ok"}
    gpt2 = result["plan_gpt2"]  # the memory-only plan of item 1, predicted for an H100 here, with bf16 autocast
    assert gpt2["exit_code"] == 0 and gpt2["memory_only"] and gpt2["amp"] and gpt2["throughput_predicted"]
    assert gpt2["noise_method"] == "not_measured" and gpt2["goodput_band_source"].startswith("PREDICTED")
    cal = {c["precision"]: c for c in result["calibration"]}
    assert set(cal) == {"fp32", "bf16 autocast"} and all(c["factor"] > 0 for c in cal.values())
    md = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN on CPU" in md and "## Peak memory" in md and "## batchpilot plan" in md
    assert "## Step-time calibration" in md and "## batchpilot plan of GPT-2 small" in md
    assert (tmp_path / "plan" / "plan.json").exists()
