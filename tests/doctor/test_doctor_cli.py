"""``batchpilot doctor``: YAML/JSON/TOML/plan input, JSON output, exit codes 0/1/2, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from batchpilot.cli import main
from batchpilot.doctor import check_config

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
BAD = EXAMPLES / "doctor-bad.yaml"
CLEAN = EXAMPLES / "doctor-clean.yaml"


def doctor(capsys, *argv):
    code = main(["doctor", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def doctor_json(capsys, *argv):
    code, out, err = doctor(capsys, *argv, "--json")
    return code, json.loads(out), err


def test_must_show_bad_example_reports_each_pitfall_and_exits_1(capsys):
    code, report, _ = doctor_json(capsys, BAD)
    assert code == 1 and report["ok"] is False
    codes = {f["code"]: f for f in report["findings"]}
    assert codes["BP201"]["severity"] == "error"  # LR unscaled after the 4x batch jump
    assert "4x" in codes["BP201"]["message"] and "0.4" in codes["BP201"]["message"]
    assert "warmup_steps is 0" in codes["BP206"]["message"]  # no warmup
    assert "BatchNorm with accumulation_steps 8" in codes["BP504"]["message"]  # BN + accumulation 8
    assert codes["BP601"]["severity"] == "error"  # EMA per micro-batch
    assert report["counts"]["error"] == sum(f["severity"] == "error" for f in report["findings"]) >= 2
    for f in report["findings"]:
        assert set(f) == {"code", "severity", "title", "message", "reason", "source", "fix", "fields"}


def test_must_show_clean_example_exits_0(capsys):
    code, report, _ = doctor_json(capsys, CLEAN)
    assert code == 0 and report["ok"] is True and report["findings"] == []
    code, out, _ = doctor(capsys, CLEAN)
    assert code == 0 and "no findings" in out


def test_human_output_lists_code_message_and_fix(capsys):
    code, out, _ = doctor(capsys, BAD)
    assert code == 1
    for needle in ("BP201", "BP601", "fix:", "why:", "2 error(s)"):
        assert needle in out


@pytest.mark.parametrize("suffix", [".json", ".toml", ".yml"])
def test_same_findings_from_json_toml_yaml(tmp_path, suffix):
    data = yaml.safe_load(BAD.read_text())
    path = tmp_path / f"cfg{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(data))
    elif suffix == ".yml":
        path.write_text(yaml.safe_dump(data))
    else:
        lines = [f"{k} = {json.dumps(v)}" for k, v in data.items()]
        path.write_text("\n".join(lines) + "\n")
    assert [f.to_dict() for f in check_config(path)] == [f.to_dict() for f in check_config(BAD)]


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("optimizer: adamw\nbase_batch: 32\nbase_lr: 1e-3\nglobal_batch: 128\nlr: 1e-3\n")
    assert any(f.code == "BP201" and "0.002" in f.message for f in check_config(path))


def test_section_and_aliases(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: {name: x}\ntrainer:\n  per_device_train_batch_size: 8\n  gradient_accumulation_steps: 4\n"
                    "  learning_rate: 0.1\n  base_batch: 8\n  base_lr: 0.1\n  optimizer: sgd\n  norm: bn\n")
    code, report, _ = doctor_json(capsys, path, "--section", "trainer")
    codes = {f["code"] for f in report["findings"]}
    assert code == 1 and {"BP204", "BP501", "BP504"} <= codes


def test_ignore_drops_codes_and_can_clear_the_gate(capsys):
    code, report, _ = doctor_json(capsys, BAD, "--ignore", "BP201", "--ignore", "bp601")
    assert code == 0 and not {"BP201", "BP601"} & {f["code"] for f in report["findings"]}
    code, _, err = doctor(capsys, BAD, "--ignore", "BP999")
    assert code == 2 and "BP999" in err


def test_plan_json(tmp_path, capsys):
    plan = {"workload": "digits-cnn-bn", "micro_batch_per_rank": 16, "accumulation_steps": 4, "world_size": 1,
            "global_batch": 64, "lr": 0.1, "lr_rule": "linear", "warmup_steps": 20, "noise_scale": None,
            "max_micro_batch": 32, "caveats": ["BN under accumulation: statistics per micro-batch of 16"],
            "predicted": {"samples_per_s": 1000.0}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    code, report, _ = doctor_json(capsys, path)
    codes = {f["code"]: f for f in report["findings"]}
    assert "BP701" in codes and "BP504" in codes  # the caveat, and BN found in the workload's model
    assert "BP001" not in codes and "BP102" not in codes
    # the workload's base point (batch 32, lr 0.05, SGD) filled in: lr 0.1 at 64 is the linear rule
    assert not {"BP201", "BP202", "BP203"} & set(codes) and "BP401" in codes


@pytest.mark.parametrize("name, text, needle", [
    ("cfg.yaml", "global_batch: [1, 2\n", "invalid YAML at line"),
    ("cfg.yaml", "- 1\n- 2\n", "must be a mapping"),
    ("cfg.yaml", "global_batch: abc\n", "global_batch must be an integer"),
    ("cfg.yaml", "global_batch: 0\n", "global_batch must be an integer"),
    ("cfg.yaml", "lr: -1\n", "lr must be a finite number > 0"),
    ("cfg.yaml", "lr: .nan\n", "lr must be a finite number"),
    ("cfg.yaml", "batch: 64\nglobal_batch: 128\n", "given twice"),
    ("cfg.yaml", "normalization: [fancynorm]\n", "normalization entries must be from"),
    ("cfg.yaml", "ema_step: sometimes\n", "ema_step must be one of"),
    ("cfg.yaml", "finetune: 'yes please'\n", "finetune must be true or false"),
    ("cfg.yaml", "workload: no-such-workload\n", "no-such-workload"),
    ("cfg.json", "{\"global_batch\": 64,}", "invalid JSON at line 1"),
    ("cfg.json", "{\"lr\": NaN}", "lr must be a finite number"),
    ("cfg.toml", "global_batch = \n", "invalid TOML"),
    ("cfg.txt", "global_batch: 64\n", "must end in .yaml"),
])
def test_malformed_config_is_one_line_exit_2(tmp_path, capsys, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    code, out, err = doctor(capsys, path, "--json")
    assert code == 2 and json.loads(out) == {"status": "error", "message": err.strip(), "exit_code": 2}
    assert err.count("\n") == 1 and needle in err, err


def test_missing_file_and_missing_section(tmp_path, capsys):
    code, _, err = doctor(capsys, tmp_path / "nope.yaml")
    assert code == 2 and "not found" in err and err.count("\n") == 1
    code, _, err = doctor(capsys, CLEAN, "--section", "trainer.batch")
    assert code == 2 and "section 'trainer.batch' not found" in err
