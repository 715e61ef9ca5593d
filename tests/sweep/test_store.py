"""The SQLite trial store: atomic claims, resume, reclaiming dead or stale owners."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchpilot.errors import BatchpilotError
from batchpilot.sweep.store import Heartbeat, TrialStore

SPEC = {"batch": 32}


def test_claim_finish_and_resume(tmp_path):
    db = tmp_path / "s.db"
    with TrialStore(db) as a:
        assert a.claim("k1", "sw", SPEC) == "claimed"
        assert a.finish("k1", {"val": 0.5, "steps": 10})
    with TrialStore(db) as b:  # a new process, later
        assert b.claim("k1", "sw", SPEC) == "done"
        row = b.get("k1")
        assert row.status == "done" and row.result == {"val": 0.5, "steps": 10} and row.attempts == 1
        assert row.spec == SPEC and row.sweep_id == "sw"
        assert [r.key for r in b.rows(["missing", "k1"])] == ["k1"]
        assert [r.key for r in b.rows(sweep_id="sw")] == ["k1"]


def test_wal_mode(tmp_path):
    db = tmp_path / "s.db"
    TrialStore(db).close()
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_live_owner_blocks_and_finish_needs_ownership(tmp_path):
    db = tmp_path / "s.db"
    a, b = TrialStore(db), TrialStore(db)
    assert a.owner != b.owner
    assert a.claim("k", "sw", SPEC) == "claimed"
    assert b.claim("k", "sw", SPEC) == "busy"  # same host, live pid (ours), fresh heartbeat
    assert not b.finish("k", {"x": 1})  # b does not own it
    assert b.get("k").status == "running"
    assert a.finish("k", {"x": 2})
    assert b.claim("k", "sw", SPEC) == "done"
    assert b.get("k").result == {"x": 2}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_dead_owner_on_this_host_is_reclaimed_at_once(tmp_path):
    import socket

    db = tmp_path / "s.db"
    ghost = TrialStore(db, owner=f"{socket.gethostname()}:{_dead_pid()}:deadbeef")
    assert ghost.claim("k", "sw", SPEC) == "claimed"  # then the process was killed
    me = TrialStore(db)
    assert me.claim("k", "sw", SPEC) == "claimed"
    row = me.get("k")
    assert row.owner == me.owner and row.attempts == 2
    assert not ghost.finish("k", {"late": True})  # a late result from the old owner is dropped
    assert me.finish("k", {"ok": True})


def test_other_host_is_reclaimed_only_when_its_heartbeat_is_stale(tmp_path):
    db = tmp_path / "s.db"
    remote = TrialStore(db, owner="some-other-host:1:abc")
    assert remote.claim("k", "sw", SPEC) == "claimed"
    assert TrialStore(db, stale_after_s=60).claim("k", "sw", SPEC) == "busy"
    time.sleep(0.3)
    assert TrialStore(db, stale_after_s=0.1).claim("k", "sw", SPEC) == "claimed"


def test_heartbeat_thread_keeps_a_claim_fresh(tmp_path):
    db = tmp_path / "s.db"
    a = TrialStore(db)
    a.claim("k", "sw", SPEC)
    t0 = a.get("k").heartbeat
    with Heartbeat(a, "k", interval_s=0.05):
        time.sleep(0.3)
    assert a.get("k").heartbeat > t0


def test_failed_trial_is_retried(tmp_path):
    db = tmp_path / "s.db"
    a = TrialStore(db)
    a.claim("k", "sw", SPEC)
    a.fail("k", "RuntimeError: boom")
    row = a.get("k")
    assert row.status == "failed" and "boom" in row.error
    b = TrialStore(db)
    assert b.claim("k", "sw", SPEC) == "claimed" and b.get("k").attempts == 2


def test_bad_paths(tmp_path):
    with pytest.raises(BatchpilotError, match="directory"):
        TrialStore(tmp_path)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(BatchpilotError, match="not a batchpilot SQLite store"):
        TrialStore(junk)


RACER = """
import sys
from batchpilot.sweep.store import TrialStore
store = TrialStore(sys.argv[1])
won = [k for k in (f"k{i}" for i in range(40)) if store.claim(k, "sw", {}) == "claimed"]
print(" ".join(won))
"""


def test_concurrent_processes_never_claim_the_same_trial(tmp_path):
    db = tmp_path / "s.db"
    TrialStore(db).close()
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(db)], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    wins = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    flat = [k for w in wins for k in w]
    assert sorted(flat) == sorted(f"k{i}" for i in range(40))  # every trial claimed once, by exactly one process
    rows = TrialStore(db).rows()
    assert all(r.attempts == 1 for r in rows)
