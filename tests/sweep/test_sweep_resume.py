"""A sweep killed with SIGKILL mid-trial loses no finished trial; two processes on one store never share a trial.
Both on a SQLite file and on a PostgreSQL server (``store_url``, conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from batchpilot.cli import main
from batchpilot.sweep.backends import open_store

ARGS = ["sweep", "--workload", "mnist1d-mlp", "--workload-opt", "num_train=600", "--workload-opt", "num_val=200",
        "--max-epochs", "3", "--sharpness-samples", "64", "--json"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def _spawn(db, batches):
    return subprocess.Popen([sys.executable, "-m", "batchpilot", *ARGS, "--batches", batches, "--store", db],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _rows(db):
    if "://" not in db and not os.path.exists(db):
        return []
    with open_store(db) as s:
        return s.rows()


def test_sigkill_mid_trial_loses_no_finished_trial(store_url, capsys):
    db = store_url
    batches = "8,16,32,64,128"
    proc = _spawn(db, batches)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            rows = _rows(db)
            if any(r.status == "done" for r in rows) and any(r.status == "running" for r in rows):
                break
            assert proc.poll() is None, "the sweep ended before it could be killed mid-trial"
            time.sleep(0.01)
        else:
            pytest.fail("no trial finished in time")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = {r.key: r for r in _rows(db)}
    done_before = {k: r for k, r in before.items() if r.status == "done"}
    killed = [k for k, r in before.items() if r.status == "running"]
    assert done_before and len(killed) == 1

    capsys.readouterr()
    assert main([*ARGS, "--batches", batches, "--store", db]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["skipped"] == len(done_before) and out["ran"] == 5 - len(done_before)
    after = {r.key: r for r in _rows(db)}
    assert all(r.status == "done" for r in after.values()) and len(after) == 5
    for k, r in done_before.items():  # finished trials are kept as they were, never rerun
        assert after[k].result == r.result and after[k].finished_at == r.finished_at and after[k].attempts == 1
    assert after[killed[0]].attempts == 2  # the killed trial was reclaimed from its dead owner and rerun
    assert sorted(t["batch"] for t in out["trials"]) == [8, 16, 32, 64, 128]


def test_two_processes_share_the_grid_without_running_a_trial_twice(store_url):
    db = store_url
    batches = "8,16,32,64,128,256"
    procs = [_spawn(db, batches) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=240)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(o["ran"] for o in outs) == 6  # each trial ran in exactly one process
    rows = _rows(db)
    assert len(rows) == 6 and all(r.status == "done" and r.attempts == 1 for r in rows)
    for o in outs:  # both report the whole grid
        assert sorted(t["batch"] for t in o["trials"]) == [8, 16, 32, 64, 128, 256]
