"""Plans that train nothing: a memory-only workload for a GPU that is not here (traced memory, predicted step
times), a given noise scale, the predicted step-time band in goodput, and train --plan refusing such a plan."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from batchpilot.cli import main
from batchpilot.errors import BatchpilotError
from batchpilot.plan import make_plan, read_plan, write_plan
from batchpilot.plan.no_training import NoiseSource, plans_without_training
from batchpilot.throughput import band


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def memory_only(mlp_workload):
    return dataclasses.replace(mlp_workload, name="toy-memory-only", memory_only=True)


def _fast(**kw):
    return dict(threads=1, throughput_budget_s=1, lr_check_budget_s=1, noise_budget_s=1, confirm_budget_s=1, **kw)


def test_a_memory_only_plan_is_throughput_alone_and_says_so(memory_only, tmp_path):
    plan = make_plan(memory_only, device="H100", **_fast())
    assert plan.memory_only and plan.throughput["device"] == "H100 (predicted, not measured)"
    assert plan.noise["method"] == "not_measured" and math.isinf(plan.noise_scale)
    assert plan.efficiency == 1.0 and plan.goodput == pytest.approx(plan.samples_per_s)
    assert set(plan.skipped) == {"lr_check", "noise_probe", "confirm"} and plan.probe_cost_s == 0
    assert plan.lr_check == {} and plan.noise_probe == {} and plan.predicted_steps_to_target is None
    assert "choice rests on throughput alone" in plan.why and "NOT MEASURED" in plan.noise_note
    assert "did not measure" in plan.lr_rule_note
    assert any("PREDICTED for H100" in c for c in plan.caveats)
    assert any("NOT MEASURED" in c for c in plan.caveats) and any("train --plan` refuses" in c for c in plan.caveats)
    # the batch is not capped by the random items, and memory caps the micro-batch
    assert plan.micro_batch_per_rank <= plan.max_micro_batch
    assert max(c["global_batch"] for c in plan.candidates) > memory_only.num_train
    # the predicted band: x1.5 either way on every goodput, marked predicted
    assert plan.goodput_band_source.startswith("PREDICTED step time")
    lo, hi = plan.goodput_band
    assert lo == pytest.approx(plan.goodput / band.UNCERTAINTY) and hi == pytest.approx(plan.goodput * band.UNCERTAINTY)
    for c in plan.candidates:
        assert c["goodput_band"][0] == pytest.approx(c["goodput"] / band.UNCERTAINTY)
    # ties lie within the relative band of the best
    best = max(c["goodput"] for c in plan.candidates)
    tied = [c for c in plan.candidates if c["global_batch"] in plan.tied_batches]
    assert tied and all(math.log(best / c["goodput"]) <= band.PREDICTED_RELATIVE + 1e-9 for c in tied)
    data = read_plan(write_plan(plan, tmp_path / "plan.json"))  # strict JSON, schema-valid
    assert data["noise_scale"] is None and data["memory_only"] is True


def test_a_given_noise_scale_is_used_and_marked(memory_only):
    plan = make_plan(memory_only, device="A100", noise_scale=64.0, amp="bfloat16", **_fast())
    assert plan.noise["method"] == "given" and plan.noise_scale == 64.0 and plan.amp == "bfloat16"
    assert "GIVEN" in plan.noise_note and any("GIVEN" in c for c in plan.caveats)
    assert "given with --noise-scale" in plan.lr_rule_note and "measured critical" not in plan.lr_rule_note
    assert not any("measured critical batch" in c for c in plan.caveats)
    big = [c for c in plan.candidates if c["global_batch"] > memory_only.base_batch]
    assert big and all(c["efficiency"] < 1 for c in big)
    assert {"best_if_noise_low", "best_if_noise_high"} <= set(plan.alternatives)
    assert plan.memory["options"]["amp"] is True and "bf16" in plan.throughput["peak_source"]


def test_a_memory_only_workload_is_never_timed_on_this_cpu(memory_only):
    with pytest.raises(BatchpilotError, match="memory-only.*cannot time it on this CPU.*--device H100"):
        make_plan(memory_only, device="cpu", **_fast())
    assert not plans_without_training("cpu") and not plans_without_training("L40S")
    assert plans_without_training("H100") and plans_without_training("A100-40GB")


def test_bad_plan_options_name_the_value(memory_only):
    with pytest.raises(BatchpilotError, match="noise scale must be a positive finite number.*-3"):
        make_plan(memory_only, device="H100", noise_scale=-3.0)
    with pytest.raises(BatchpilotError, match="amp must be one of bfloat16, float16"):
        make_plan(memory_only, device="H100", amp="int8")
    with pytest.raises(BatchpilotError, match="reason"):
        NoiseSource(None, " ")


def test_fp16_for_a_predicted_gpu_is_planned_but_fp16_on_the_cpu_is_not(mlp_workload):
    with pytest.raises(BatchpilotError, match="fp16 needs a CUDA device"):
        make_plan(mlp_workload, device="cpu", amp="float16", **_fast())


@pytest.fixture
def tiny_config(tmp_path):
    pytest.importorskip("transformers")
    path = tmp_path / "tiny-gpt2.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64,
                                "vocab_size": 128}))
    return path


@pytest.mark.slow
def test_plan_cli_for_a_memory_only_hf_model_then_train_refuses_it(tiny_config, tmp_path, capsys):
    out = tmp_path / "P"
    assert main(["plan", "--workload", f"hf:{tiny_config}", "--workload-opt", "seq_len=32", "--device", "H100", "--amp", "bf16",
                 "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    assert plan["memory_only"] and plan["amp"] == "bfloat16" and plan["tokens_per_sample"] == 32
    assert plan["throughput"]["device"].endswith("(predicted, not measured)") and "not runnable" in captured.err
    html = (out / "report.html").read_text()
    assert "PREDICTED" in html and "tokens/s" in html and "NOT MEASURED" in html and "Noise probe: not run" in html
    assert main(["train", "--plan", str(out / "plan.json"), "--steps", "1"]) == 2
    assert "memory-only workload" in capsys.readouterr().err
    assert main(["plan", "--workload", f"hf:{tiny_config}", "--workload-opt", "seq_len=32", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "memory-only" in err and "--device H100" in err


def test_plan_text_shows_tokens_per_s_and_the_predicted_band(tiny_config, tmp_path, capsys):
    assert main(["plan", "--workload", f"hf:{tiny_config}", "--workload-opt", "seq_len=32", "--device", "H100", "--noise-scale",
                 "256", "--out", str(tmp_path / "P"), "--no-report"]) == 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "PREDICTED step time" in text and "GIVEN" in text and "not runnable" in text
    assert main(["train", "--plan", str(tmp_path / "P" / "plan.json"), "--steps", "1"]) == 2
    assert "memory-only workload" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_hf_gpt2_for_an_h100_is_predicted_and_quick(tmp_path, capsys):
    """The issue's must-show: the full GPT-2 small, traced and predicted, nothing trained (about a minute)."""
    pytest.importorskip("transformers")
    import time

    start = time.perf_counter()
    assert main(["plan", "--workload", "hf:gpt2", "--device", "H100", "--json", "--out", str(tmp_path), "--no-report",
                 "--threads", "1"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert time.perf_counter() - start < 180
    assert plan["throughput"]["device"] == "H100 (predicted, not measured)" and plan["tokens_per_sample"] == 1024
    assert plan["noise"]["method"] == "not_measured" and plan["goodput_band"][0] < plan["goodput"] < plan["goodput_band"][1]
    assert 1 <= plan["micro_batch_per_rank"] <= plan["max_micro_batch"]


def test_a_given_noise_scale_on_a_trainable_workload_skips_only_the_probe(mlp_workload):
    from plan_fakes import fake_curve

    plan = make_plan(mlp_workload, noise_scale=100.0, throughput=fake_curve(), lr_check=False, threads=1)
    assert plan.noise["method"] == "given" and plan.noise_scale == 100.0 and not plan.memory_only
    assert set(plan.skipped) == {"noise_probe", "confirm"} and plan.goodput_band_source == "measured: timing rounds"
    assert plan.predicted_steps_to_target is None and plan.noise_probe == {}


def test_train_plan_trains_with_the_plans_amp(monkeypatch, tmp_path, capsys):
    import batchpilot.plan as plan_pkg
    from plan_fakes import fake_curve, fake_probe

    real = plan_pkg.make_plan
    monkeypatch.setattr(plan_pkg, "make_plan", lambda w, **kw: real(w, probe=fake_probe(), throughput=fake_curve(),
                                                                      threads=1, lr_check=False, amp=kw["amp"]))
    assert main(["plan", "--workload", "mnist1d-mlp", "--workload-opt", "num_train=600", "--amp", "bf16",
                 "--out", str(tmp_path), "--no-report", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["amp"] == "bfloat16"
    assert main(["train", "--plan", str(tmp_path / "plan.json"), "--steps", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["amp"] == "bfloat16"


def test_a_calibration_scales_the_prediction_and_sets_the_band(memory_only, tmp_path):
    cal = band.calibrate([2.0, 4.4, 7.6], [1.0, 2.0, 4.0], "NVIDIA H100 80GB HBM3")
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps({"calibration": [{"precision": "fp32", **cal.to_dict()}]}))
    loaded = band.load_calibration(str(path), amp=False)
    assert loaded.factor == pytest.approx(cal.factor) and loaded.band == cal.band
    with pytest.raises(BatchpilotError, match="no bf16 autocast calibration"):
        band.load_calibration(str(path), amp=True)
    with pytest.raises(BatchpilotError, match="missing.json' does not exist"):
        band.load_calibration(str(tmp_path / "missing.json"), amp=False)
    (tmp_path / "truncated.json").write_text('{"factor": 1.')
    with pytest.raises(BatchpilotError, match="not readable JSON"):
        band.load_calibration(str(tmp_path / "truncated.json"), amp=False)
    plain = make_plan(memory_only, device="H100", **_fast())
    calibrated = make_plan(memory_only, device="H100", calibration=loaded, **_fast())
    by_batch = {p["batch"]: p["step_s"] for p in plain.throughput["points"]}
    for p in calibrated.throughput["points"]:
        assert p["step_s"] == pytest.approx(by_batch[p["batch"]] * cal.factor)
    assert cal.band.describe() in calibrated.goodput_band_source
    lo, hi = calibrated.goodput_band
    assert lo == pytest.approx(calibrated.goodput / cal.band.high_factor)
    assert any("measured on NVIDIA H100" in c for c in calibrated.caveats)
