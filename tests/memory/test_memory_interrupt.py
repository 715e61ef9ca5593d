"""Ctrl-C during ``batchpilot memory``: exit 130 and one line, no traceback, nothing half-written."""

from __future__ import annotations

from batchpilot.cli import main


def test_ctrl_c_while_tracing_is_130_one_line(tmp_path, capsys, monkeypatch):
    def interrupted_trace(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("batchpilot.cli.memory_cmd.memory_curve", interrupted_trace)
    code = main(["memory", "--workload", "mnist1d-mlp", "--workload-opt", "num_train=600", "--workload-opt", "num_val=200", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines() == ["batchpilot memory: interrupted"]
    assert not (tmp_path / "m" / "memory.json").exists()
