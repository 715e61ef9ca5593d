"""plan.json schema (types, ranges, batch arithmetic, versions) and the workload a plan may run."""

from __future__ import annotations

import json

import pytest

from batchpilot.errors import BatchpilotError
from batchpilot.plan import read_plan
from batchpilot.plan.schema import SCHEMA_VERSION, validate_plan
from batchpilot.plan.workload_spec import describe, kind_of, run_command, spec_of, workload_for_run


def good_plan(**changes) -> dict:
    plan = {"schema_version": SCHEMA_VERSION, "workload": "mnist1d-mlp",
            "workload_spec": {"name": "mnist1d-mlp", "options": {"num_train": 400}, "kind": "builtin", "file": None},
            "micro_batch_per_rank": 16, "accumulation_steps": 2, "world_size": 2, "global_batch": 64, "lr": 0.1,
            "lr_rule": "linear", "warmup_steps": 5, "schedule": "constant", "threads": 1, "caveats": [],
            "noise_scale": None, "predicted_steps_to_target": 120}
    plan.update(changes)
    return plan


def test_a_good_plan_passes_and_extra_fields_are_tolerated():
    data = good_plan(goodput_band=[1.0, 2.0], some_future_field={"x": 1})
    assert validate_plan(data) is data


@pytest.mark.parametrize("field, value, needle", [
    ("lr", "abc", "lr must be a finite number > 0, got 'abc'"),
    ("lr", -0.1, "got -0.1"),
    ("lr", float("inf"), "got inf"),
    ("lr", True, "got True"),
    ("threads", -3, "threads must be an integer from 1 to 1e15, got -3"),
    ("threads", [1, 2], "threads must be an integer from 1 to 1e15, got [1, 2]"),
    ("workload", 42, "workload must be a non-empty string, got 42"),
    ("micro_batch_per_rank", 1.5, "micro_batch_per_rank must be an integer"),
    ("accumulation_steps", 0, "accumulation_steps must be an integer from 1"),
    ("world_size", "2", "world_size must be an integer"),
    ("warmup_steps", -1, "warmup_steps must be an integer from 0"),
    ("lr_rule", "cubic", "lr_rule must be one of linear, sqrt, none, got 'cubic'"),
    ("schedule", "step", "schedule must be one of"),
    ("caveats", "be careful", "caveats must be a list of strings"),
    ("schema_version", 0, "schema_version must be an integer from 1"),
    ("global_batch", 10**30, "global_batch must be an integer from 1 to 1e15"),
    ("workload_spec", ["x"], "workload_spec must be a JSON object"),
    ("predicted_steps_to_target", "many", "predicted_steps_to_target must be an integer"),
])
def test_wrong_types_and_ranges_are_one_line_errors(field, value, needle):
    with pytest.raises(BatchpilotError) as exc:
        validate_plan(good_plan(**{field: value}), "plan file 'p.json'")
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg and msg.startswith("plan file 'p.json'")


def test_batch_product_missing_keys_version_and_spec_fields():
    with pytest.raises(BatchpilotError, match=r"global_batch 60 != micro_batch_per_rank 16 x accumulation_steps 2 x world_size 2 = 64"):
        validate_plan(good_plan(global_batch=60))
    data = good_plan()
    del data["lr"]
    with pytest.raises(BatchpilotError, match="lacks lr"):
        validate_plan(data)
    with pytest.raises(BatchpilotError, match="schema_version 99 is newer"):
        validate_plan(good_plan(schema_version=99))
    with pytest.raises(BatchpilotError, match="workload_spec.options"):
        validate_plan(good_plan(workload_spec={"name": "x.py:f", "options": [1]}))
    with pytest.raises(BatchpilotError, match=r"worlds.elastic\[0\].world_size"):
        validate_plan(good_plan(worlds={"elastic": [{"world_size": 0, "compatible": True}]}))
    with pytest.raises(BatchpilotError, match="must hold a JSON object"):
        validate_plan([1, 2])
    assert validate_plan(good_plan(workload_spec={}))  # {} = not recorded (Python API plans)


def test_huge_values_stay_short_in_messages():
    with pytest.raises(BatchpilotError) as exc:
        validate_plan(good_plan(lr="x" * 100_000))
    assert len(str(exc.value)) < 300
    with pytest.raises(BatchpilotError) as exc:
        validate_plan(good_plan(threads=10**5000))
    assert "digits" in str(exc.value) and len(str(exc.value)) < 300


def test_read_plan_uses_the_schema(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(good_plan(lr="abc")))
    with pytest.raises(BatchpilotError, match=r"plan file '.*plan.json': lr must be a finite number > 0, got 'abc'"):
        read_plan(path)
    path.write_text("{not json")
    with pytest.raises(BatchpilotError, match="not readable JSON"):
        read_plan(path)
    with pytest.raises(BatchpilotError, match="is a directory"):
        read_plan(tmp_path)
    path.write_text(json.dumps(good_plan()))
    assert read_plan(path)["global_batch"] == 64


def test_integrations_read_plan_files_through_the_schema(tmp_path):
    from batchpilot.integrations.plan import load_plan

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(good_plan(threads=[1])))
    with pytest.raises(BatchpilotError, match="threads must be an integer"):
        load_plan(path)


def test_workload_kinds_and_specs(tmp_path):
    assert kind_of("mnist1d-mlp") == "builtin" and kind_of("hf:gpt2") == "hf"
    assert kind_of("my.py:make") == "path" and kind_of("dir/x:make") == "path"
    assert kind_of("pkg.mod:make") == "module" and kind_of("nope") == "unknown"
    spec = describe("my.py:make", {"n": 1})
    assert spec["kind"] == "path" and spec["file"].endswith("my.py") and spec["options"] == {"n": 1}
    assert run_command("P/plan.json", spec) == "batchpilot train --plan P/plan.json --workload my.py:make"
    assert run_command("my plan/plan.json", describe("mnist1d-cnn")) == "batchpilot train --plan 'my plan/plan.json'"
    assert spec_of({"workload": "toy"})["kind"] == "unknown"  # an old plan naming a user workload


def test_only_code_named_on_the_command_line_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user = good_plan(workload="toy", workload_spec=describe("my.py:make", {"n": 2}))
    with pytest.raises(BatchpilotError, match=r"runs your code 'my.py:make'.*add --workload my.py:make \(or --trust-plan-workload\)"):
        workload_for_run(user, "p.json", None, {}, default="mnist1d-cnn")
    assert workload_for_run(user, "p.json", "my.py:make", {"m": 3}, default="d") == ("my.py:make", {"n": 2, "m": 3})
    assert workload_for_run(user, "p.json", str(tmp_path / "my.py") + ":make", {}, default="d")[1] == {"n": 2}
    assert workload_for_run(user, "p.json", None, {}, trust=True, default="d") == ("my.py:make", {"n": 2})
    with pytest.raises(BatchpilotError, match="is for workload 'my.py:make', not 'other.py:make'"):
        workload_for_run(user, "p.json", "other.py:make", {}, default="d")
    with pytest.raises(BatchpilotError, match="is for workload 'my.py:make', not 'my.py:other'"):
        workload_for_run(user, "p.json", "my.py:other", {}, default="d")
    builtin = good_plan()
    assert workload_for_run(builtin, "p.json", None, {"num_val": 50}, default="d") == (
        "mnist1d-mlp", {"num_train": 400, "num_val": 50})
    with pytest.raises(BatchpilotError, match="is for workload 'mnist1d-mlp', not 'charlm'"):
        workload_for_run(builtin, "p.json", "charlm", {}, default="d")
    old = {k: v for k, v in good_plan(workload="toy").items() if k != "workload_spec"}
    with pytest.raises(BatchpilotError, match="not built in and the plan does not record how to load it"):
        workload_for_run(old, "p.json", None, {}, default="d")
    assert workload_for_run(old, "p.json", "my.py:make", {}, default="d") == ("my.py:make", {})
