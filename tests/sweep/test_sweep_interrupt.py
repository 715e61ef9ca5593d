"""Ctrl-C during a sweep trial: exit 130 and one line on stderr (stdout stays clean for --json), the
interrupted trial is left to run again, finished ones are kept."""

from __future__ import annotations

import signal

from batchpilot.cli import main
from batchpilot.sweep.store import TrialStore


def test_ctrl_c_in_a_trial_is_130_one_line_and_the_trial_runs_again(tmp_path, capsys, monkeypatch):
    store = tmp_path / "s.db"
    args = ["sweep", "--workload", "mnist1d-mlp", "--workload-opt", "num_train=600", "--workload-opt", "num_val=200",
            "--batches", "64,128", "--max-epochs", "1", "--no-sharpness", "--store", str(store), "--json"]
    steps = {"n": 0}

    def sigint_on_the_8th_step(step: int) -> None:  # batch 64 takes 10 steps: the SIGINT lands in trial 1
        steps["n"] += 1
        if steps["n"] == 8:
            signal.raise_signal(signal.SIGINT)

    with monkeypatch.context() as m:
        m.setattr("batchpilot.train.loop.maybe_inject_fault", sigint_on_the_8th_step)
        code = main(args)
    out, err = capsys.readouterr()
    assert code == 130 and out == "" and "Traceback" not in err
    assert [ln for ln in err.splitlines() if "interrupted" in ln] == [
        "batchpilot sweep: interrupted; finished trials are stored, rerun the same command to resume"]
    with TrialStore(store) as s:
        assert [(r.status, r.error) for r in s.rows()] == [("failed", "interrupted")]
    assert main(args) == 0  # the rerun runs both trials
    with TrialStore(store) as s:
        assert sorted((r.status, r.attempts) for r in s.rows()) == [("done", 1), ("done", 2)]
