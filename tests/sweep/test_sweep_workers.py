"""``batchpilot sweep --workers N``: N local worker processes share the grid through the store (SQLite or
PostgreSQL), each trial runs once, and the parent reports every trial; the workers' share of threads."""

from __future__ import annotations

import json

import pytest

from batchpilot.cli import main
from batchpilot.sweep.backends import is_server_store, open_store
from batchpilot.sweep.workers import cpu_share

SMALL = ["sweep", "--workload", "mnist1d-mlp", "--workload-opt", "num_train=600", "--workload-opt", "num_val=200",
         "--max-epochs", "1", "--no-sharpness", "--evals-per-epoch", "2"]


def test_two_workers_run_each_trial_once_and_report_the_grid(store_url, capfd):
    if is_server_store(store_url):  # a password in the URL never reaches the output (the test server trusts anyone)
        store_url = store_url.replace("batchpilot@", "batchpilot:s3cret@")
    args = [*SMALL, "--batches", "32,64,128,256", "--workers", "2", "--store", store_url, "--json"]
    capfd.readouterr()
    assert main(args) == 0
    out, err = capfd.readouterr()
    data = json.loads(out)
    assert data["ran"] == 4 and data["skipped"] == 0 and data["failed"] == []
    assert sorted(t["batch"] for t in data["trials"]) == [32, 64, 128, 256]
    assert [w["exit_code"] for w in data["workers"]] == [0, 0] and sum(w["ran"] for w in data["workers"]) == 4
    assert data["sweep"]["threads"] == cpu_share(2) and all(t["threads"] == cpu_share(2) for t in data["trials"])
    assert "s3cret" not in out + err
    assert "2 workers x" in err and err.count(": started") == 4  # each trial started once, by one worker
    with open_store(store_url) as s:
        rows = s.rows()
    assert len(rows) == 4 and all(r.status == "done" and r.attempts == 1 for r in rows)
    assert len({r.owner for r in rows}) == 2  # both workers ran trials

    assert main(args) == 0  # a rerun finds the grid done
    again = json.loads(capfd.readouterr().out)
    assert again["ran"] == 0 and again["skipped"] == 4 and again["trials"] == data["trials"]


@pytest.mark.parametrize("flags, message", [(["--workers", "0"], "--workers must be an integer >= 1"),
                                            (["--lease", "0"], "--lease must be a number of seconds > 0"),
                                            (["--store", "mysql://u:pw@h/db"], "mysql:// is not supported")])
def test_bad_worker_flags_exit_2(tmp_path, capsys, flags, message):
    capsys.readouterr()
    assert main([*SMALL, "--batches", "32", "--store", str(tmp_path / "s.db"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "pw@" not in err
