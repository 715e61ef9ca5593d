"""The CLI's front door: help and defaults, metavars, dtype names, text output, broken stdout, results kept
when an output cannot be written, and the doctor's advice on a training run."""

from __future__ import annotations

import argparse
import errno
import io
import json
from pathlib import Path

import pytest

from batchpilot.cli import HelpFormatter, build_parser, main
from batchpilot.cli.outputs import check_out_dir, check_out_file, save_or_fallback
from batchpilot.errors import BatchpilotError

SMALL = ["--workload", "mnist1d-mlp", "--workload-opt", "num_train=400", "--workload-opt", "num_val=100"]


def _verbs() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _flags():
    for verb, p in _verbs().items():
        for action in p._actions:
            if not isinstance(action, argparse._HelpAction):
                yield verb, action


def test_six_verbs():
    assert set(_verbs()) == {"workloads", "train", "memory", "plan", "sweep", "doctor"}


def test_every_flag_has_help_and_shows_its_default():
    for verb, action in _flags():
        assert action.help, (verb, action.option_strings or action.dest)
        shown = HelpFormatter("batchpilot")._get_help_string(action)
        meaningful = action.option_strings and action.default not in (None, False, [], "") and action.nargs != 0
        if meaningful:
            assert "default" in shown, (verb, action.option_strings, shown)


def test_help_output_of_every_verb(capsys):
    for verb in _verbs():
        with pytest.raises(SystemExit) as exc:
            main([verb, "--help"])
        assert exc.value.code == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "None" not in out, verb
        if verb == "sweep":
            assert "--seeds N seeds per (batch, multiplier) (default: 1)" in out
        if verb == "train":
            assert "--plan PLAN_JSON" in out and "--dtype DTYPE" in out


def test_same_flag_same_metavar_everywhere():
    metavars: dict[str, set] = {}
    for verb, action in _flags():
        if action.option_strings and action.nargs != 0 and action.choices is None:
            metavars.setdefault(action.option_strings[0], set()).add(action.metavar)
    for flag, names in metavars.items():
        assert len(names) == 1 and None not in names, (flag, names)
    assert metavars["--plan"] == {"PLAN_JSON"} and metavars["--out"] == {"DIR"}
    assert metavars["--workload"] == {"NAME|FILE.py:FN"}


@pytest.mark.parametrize("verb, given, parsed", [
    ("memory", "fp32", "float32"), ("memory", "float32", "float32"), ("memory", "bf16", "bfloat16"),
    ("memory", "bfloat16", "bfloat16"), ("memory", "fp16", "float16"), ("memory", "float16", "float16"),
    ("train", "fp32", "float32"), ("train", "BF16", "bfloat16"), ("train", "bfloat16", "bfloat16"),
    ("train", "float64", "float64"),
])
def test_dtype_names(verb, given, parsed):
    assert build_parser().parse_args([verb, "--dtype", given]).dtype == parsed


def test_train_runs_in_bf16(capsys):
    assert main(["train", *SMALL, "--dtype", "bf16", "--steps", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "completed"


def test_text_output_has_no_none_and_labels_the_noise_scale(capsys):
    assert main(["train", *SMALL, "--batch", "64", "--micro-batch", "16", "--steps", "3", "--noise-scale"]) == 0
    out = capsys.readouterr().out
    assert "None" not in out and "units" not in out
    assert "B_simple" in out and "samples" in out
    from batchpilot.cli.train_cmd import unit_name
    from batchpilot.workloads import get_workload

    assert unit_name(get_workload("charlm")) == "tokens"
    for argv in (["workloads"], ["memory", *SMALL, "--batch-sizes", "1,4,16"],
                 ["doctor", str(Path(__file__).resolve().parents[2] / "docs/examples/doctor-bad.yaml")]):
        main(argv)
        out = capsys.readouterr().out
        assert out and "None" not in out, argv


def test_plan_table_has_no_none(capsys):
    from batchpilot.cli.plan_cmd import render_plan
    from batchpilot.plan import make_plan
    from batchpilot.workloads import get_workload
    from plan_fakes import fake_curve, fake_probe

    plan = make_plan(get_workload("mnist1d-mlp", num_train=400, num_val=100), probe=fake_probe(),
                     throughput=fake_curve(), threads=1)
    render_plan(plan.to_dict(), Path("out"))
    out = capsys.readouterr().out
    assert "None" not in out and "samples" in out


def test_train_prints_the_doctors_warnings_on_stderr_and_still_runs(capsys):
    # README's accumulation example without its warmup: 8x the base LR at once
    argv = ["train", "--workload", "mnist1d-mlp", "--batch", "256", "--micro-batch", "32", "--steps", "3", "--json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["status"] == "completed"
    assert "doctor error BP206" in err and "warmup_steps is 0" in err
    assert main([*argv, "--warmup-steps", "10"]) == 0  # the README's version: nothing to say
    out, err = capsys.readouterr()
    assert "doctor" not in err


class _FullStdout(io.TextIOBase):
    def __init__(self, exc: OSError) -> None:
        self.exc = exc

    def write(self, text: str) -> int:
        raise self.exc

    def flush(self) -> None:
        raise self.exc

    def fileno(self) -> int:
        raise io.UnsupportedOperation("no fd")


@pytest.mark.parametrize("argv", [["workloads"], ["workloads", "--json"],
                                  ["doctor", str(Path(__file__).resolve().parents[2] / "docs/examples/doctor-clean.yaml")]])
def test_stdout_on_a_full_device_is_one_line_not_a_traceback(monkeypatch, capsys, argv):
    monkeypatch.setattr("sys.stdout", _FullStdout(OSError(errno.ENOSPC, "No space left on device")))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err


def test_broken_pipe_is_not_an_error(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout", _FullStdout(BrokenPipeError(errno.EPIPE, "Broken pipe")))
    assert main(["workloads", "--json"]) == 0
    assert capsys.readouterr().err == ""


def test_train_result_survives_an_unwritable_summary(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "summary.json").mkdir(parents=True)  # the write will fail after training
    assert main(["train", *SMALL, "--steps", "2", "--out", str(out), "--json"]) == 2
    printed, err = capsys.readouterr()
    assert json.loads(printed)["status"] == "completed"
    lines = [line for line in err.splitlines() if line.strip()]  # (the progress bar may leave a blank line)
    assert len(lines) == 1 and "could not write" in err and "saved to" in err
    saved = Path(err.split("saved to ")[1].split()[0].rstrip(";"))
    try:
        assert json.loads(saved.read_text())["status"] == "completed"
    finally:
        saved.unlink()


def test_memory_result_survives_an_unwritable_output(tmp_path, capsys):
    out = tmp_path / "mem"
    (out / "memory.json").mkdir(parents=True)
    assert main(["memory", *SMALL, "--batch-sizes", "1,4,16", "--no-what-if", "--out", str(out)]) == 2
    text, err = capsys.readouterr()
    assert "largest micro-batch" in text and "saved to" in err
    saved = Path(err.split("saved to ")[1].split()[0])
    try:
        assert json.loads(saved.read_text())["workload"] == "mnist1d-mlp"
    finally:
        saved.unlink()


def test_plan_result_survives_an_unwritable_plan_json(tmp_path, capsys, monkeypatch):
    import batchpilot.plan as plan_pkg
    from plan_fakes import fake_curve, fake_probe

    real = plan_pkg.make_plan
    monkeypatch.setattr(plan_pkg, "make_plan", lambda w, **kw: real(w, probe=fake_probe(), throughput=fake_curve(),
                                                                      threads=1))
    out = tmp_path / "p"
    (out / "plan.json").mkdir(parents=True)
    assert main(["plan", *SMALL, "--out", str(out), "--no-report", "--json"]) == 2
    printed, err = capsys.readouterr()
    assert json.loads(printed)["global_batch"] >= 1
    saved = Path(err.split("saved to ")[1].split()[0])
    try:
        assert json.loads(saved.read_text())["workload_spec"]["name"] == "mnist1d-mlp"
    finally:
        saved.unlink()


def test_output_path_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    assert check_out_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    for bad in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(BatchpilotError, match="f' exists and is not a directory|f/sub'.* is a file"):
            check_out_dir(bad)
    with pytest.raises(BatchpilotError, match="is a directory"):
        check_out_file(tmp_path, "--store")
    with pytest.raises(BatchpilotError, match="is a file"):
        check_out_file(tmp_path / "f" / "s.db", "--store")
    assert check_out_file(tmp_path / "s.db", "--store") == tmp_path / "s.db"


def test_save_or_fallback_keeps_the_data(tmp_path):
    assert save_or_fallback(lambda: None, {}, verb="x", what="w", name="n.json") is None

    def fail():
        raise OSError(errno.ENOSPC, "No space left on device")

    msg = save_or_fallback(fail, {"a": 1}, verb="train", what="out/summary.json", name="summary.json")
    assert msg.startswith("could not write out/summary.json: No space left on device; the result was saved to ")
    saved = Path(msg.rsplit(" ", 1)[1])
    try:
        assert json.loads(saved.read_text()) == {"a": 1} and saved.name.startswith("batchpilot-train-summary-")
    finally:
        saved.unlink()
