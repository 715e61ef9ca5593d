"""One store suite, two backends: every test runs on a SQLite file and on a real PostgreSQL server started by
the tests (``conftest.py``; the PostgreSQL half skips with the reason where no server can be started).

Claims are atomic (racing processes never claim a trial twice), a dead owner's trial is reclaimed (at once on
this host, after its lease elsewhere), a heartbeat keeps a lease, a finished trial survives ``kill -9`` of its
worker, four workers share a grid without running a trial twice, and a worker killed while it holds a claim
does not block the sweep.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from batchpilot.errors import BatchpilotError
from batchpilot.sweep.backends import is_server_store, open_store
from batchpilot.sweep.store import SCHEMA_VERSION, Heartbeat

SPEC = {"batch": 32}
HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _sql(url: str, statement: str, params: tuple = ()) -> None:
    """Run one statement on the store behind ``url`` outside batchpilot (to damage or age a row)."""
    if is_server_store(url):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(statement.replace("?", "%s").replace("trials", "batchpilot_trials"), params)
    else:
        with sqlite3.connect(url) as conn:
            conn.execute(statement, params)
        conn.close()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- claims, leases, results ----------------------------------------------------------------------

def test_claim_finish_and_resume(store_url):
    with open_store(store_url) as a:
        assert a.claim("k1", "sw", SPEC) == "claimed"
        assert a.claim("k2", "sw", SPEC) == "claimed"
        assert a.finish("k1", {"val": 0.5, "steps": 10})
    with open_store(store_url) as b:  # a new process, later
        assert b.claim("k1", "sw", SPEC) == "done"
        row = b.get("k1")
        assert row.status == "done" and row.result == {"val": 0.5, "steps": 10} and row.attempts == 1
        assert row.spec == SPEC and row.sweep_id == "sw" and row.finished_at >= row.started_at
        assert [r.key for r in b.rows(["missing", "k2", "k1"])] == ["k2", "k1"]
        assert [r.key for r in b.rows(sweep_id="sw")] == ["k1", "k2"] == [r.key for r in b.rows()]
        assert b.get("missing") is None


def test_live_owner_blocks_and_finish_needs_ownership(store_url):
    with open_store(store_url) as a, open_store(store_url) as b:
        assert a.owner != b.owner
        assert a.claim("k", "sw", SPEC) == "claimed"
        assert b.claim("k", "sw", SPEC) == "busy"  # same host, live pid (ours), fresh heartbeat
        assert not b.finish("k", {"x": 1})  # b does not own it
        assert not b.heartbeat("k")
        assert b.get("k").status == "running"
        assert a.finish("k", {"x": 2})
        assert b.claim("k", "sw", SPEC) == "done"
        assert b.get("k").result == {"x": 2}


def test_dead_owner_on_this_host_is_reclaimed_at_once(store_url):
    with open_store(store_url, owner=f"{socket.gethostname()}:{_dead_pid()}:deadbeef") as ghost, \
            open_store(store_url) as me:
        assert ghost.claim("k", "sw", SPEC) == "claimed"  # then the process was killed
        assert me.claim("k", "sw", SPEC) == "claimed"
        row = me.get("k")
        assert row.owner == me.owner and row.attempts == 2
        assert not ghost.finish("k", {"late": True})  # a late result from the old owner is dropped
        assert me.finish("k", {"ok": True})
        assert me.get("k").result == {"ok": True}


def test_other_host_is_reclaimed_only_after_its_lease(store_url):
    with open_store(store_url, owner="some-other-host:1:abc") as remote:
        assert remote.claim("k", "sw", SPEC) == "claimed"
        with open_store(store_url, stale_after_s=60) as patient:
            assert patient.claim("k", "sw", SPEC) == "busy"
        time.sleep(0.3)
        with open_store(store_url, stale_after_s=0.1) as other:
            assert other.claim("k", "sw", SPEC) == "claimed"
            assert not remote.heartbeat("k")  # the lease is gone: the old owner learns it on its next beat
            assert other.get("k").attempts == 2


def test_heartbeat_keeps_the_lease(store_url):
    with open_store(store_url, owner="some-other-host:1:abc") as a:
        a.claim("k", "sw", SPEC)
        t0 = a.get("k").heartbeat
        with Heartbeat(a, "k", interval_s=0.05):
            time.sleep(0.6)
            with open_store(store_url, stale_after_s=0.4) as b:
                assert b.claim("k", "sw", SPEC) == "busy"  # older than the lease, but kept fresh
        assert a.get("k").heartbeat > t0


def test_failed_trial_is_retried(store_url):
    with open_store(store_url) as a:
        a.claim("k", "sw", SPEC)
        a.fail("k", "RuntimeError: boom")
        row = a.get("k")
        assert row.status == "failed" and "boom" in row.error
    with open_store(store_url) as b:
        assert b.claim("k", "sw", SPEC) == "claimed" and b.get("k").attempts == 2


def test_damaged_rows_are_skipped_reported_and_run_again(store_url):
    with open_store(store_url) as store:
        for k in ("a", "b", "c"):
            assert store.claim(k, "sw", {"k": k}) == "claimed"
            store.finish(k, {"x": k})
    _sql(store_url, "UPDATE trials SET result = ? WHERE key = ?", ('{"x": tru', "a"))
    _sql(store_url, "UPDATE trials SET spec = ? WHERE key = ?", ("[1, 2]", "b"))
    with open_store(store_url) as store:
        assert [r.key for r in store.rows()] == ["c"]
        assert set(store.invalid) == {"a", "b"}
        assert "result is not JSON" in store.invalid["a"] and "spec is not a JSON object" in store.invalid["b"]
        assert store.claim("a", "sw", {"k": "a"}) == "claimed"
        assert store.claim("c", "sw", {"k": "c"}, check=lambda r: "wrong x") == "claimed"
        row = store.get("c")
        assert row.status == "running" and row.attempts == 2 and row.error == "re-run: wrong x"


def test_a_result_that_is_not_json_is_refused_before_anything_is_written(store_url):
    with open_store(store_url) as store:
        store.claim("k", "sw", SPEC)
        with pytest.raises(ValueError):
            store.finish("k", {"x": float("nan")})
        assert store.get("k").status == "running"


RACER = """
import sys
from batchpilot.sweep.backends import open_store
with open_store(sys.argv[1]) as store:
    won = [k for k in (f"k{i}" for i in range(40)) if store.claim(k, "sw", {}) == "claimed"]
    print(" ".join(won), flush=True)
    sys.stdin.read()  # alive (holding its claims) until every racer is done: a dead owner's claims are free
"""


def test_racing_processes_never_claim_the_same_trial(store_url):
    open_store(store_url).close()
    procs = [subprocess.Popen([sys.executable, "-c", RACER, store_url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=ENV) for _ in range(3)]
    try:
        wins = [p.stdout.readline().split() for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=60)
    assert all(p.returncode == 0 for p in procs)
    flat = [k for w in wins for k in w]
    assert sorted(flat) == sorted(f"k{i}" for i in range(40))  # every trial claimed once, by exactly one process
    with open_store(store_url) as s:
        assert all(r.attempts == 1 for r in s.rows())


# -- whole workers: kill -9, four at once, a dead one holding a claim -------------------------------

def _worker(store_url, log, batches, *extra):
    return subprocess.Popen([sys.executable, str(HERE / "store_worker.py"), store_url, str(log), "--batches", batches,
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _events(log: Path) -> list[tuple[str, int, int, float]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        kind, batch, pid, t = line.split()
        out.append((kind, int(batch), int(pid), float(t)))
    return out


def _wait_for(predicate, what: str, procs=(), timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        for p in procs:
            assert p.poll() is None, f"a worker ended before {what}: {p.communicate()[1][-2000:]}"
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _kill9(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _finish(proc, timeout: float = 120.0) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)


@pytest.mark.parametrize("where", ["this-host", "other-host"])
def test_kill9_mid_trial_loses_no_finished_trial_and_the_trial_reruns_after_its_lease(store_url, tmp_path, where):
    """Same host: the dead pid frees the trial at once (the lease is 10 minutes, so nothing else could). Another
    host: only the lease can tell, so the trial runs again only once its heartbeat is older than the lease (2 s)."""
    log, lease = tmp_path / "log", 2.0 if where == "other-host" else 600.0
    host = ["--owner-host", "elsewhere"] if where == "other-host" else []
    a = _worker(store_url, log, "8,16,32,64", "--hang-batch", "32", "--stale-s", str(lease), *host)
    try:
        _wait_for(lambda: ("start", 32) in [e[:2] for e in _events(log)], "the worker to start batch 32", [a])
        time.sleep(0.5)  # a few heartbeats
    finally:
        _kill9(a)
    with open_store(store_url) as s:
        before = {r.spec["trial"]["batch"]: r for r in s.rows()}
    assert {b: r.status for b, r in before.items()} == {8: "done", 16: "done", 32: "running"}
    killed_beat = before[32].heartbeat

    b = _worker(store_url, log, "8,16,32,64", "--stale-s", str(lease))
    out = _finish(b)
    assert out == {"ran": 2, "skipped": 2, "failed": 0, "batches": [8, 16, 32, 64]}
    with open_store(store_url) as s:
        after = {r.spec["trial"]["batch"]: r for r in s.rows()}
    assert all(r.status == "done" for r in after.values()) and len(after) == 4
    for batch in (8, 16):  # finished trials are kept as they were, never rerun
        assert after[batch].result == before[batch].result and after[batch].attempts == 1
        assert after[batch].finished_at == before[batch].finished_at
    assert after[32].attempts == 2 and after[32].result["pid"] == b.pid
    starts = Counter(e[1] for e in _events(log) if e[0] == "start")
    assert starts == {8: 1, 16: 1, 32: 2, 64: 1}
    if where == "other-host":
        assert after[32].started_at - killed_beat >= lease  # waited for the lease


def test_four_workers_never_run_a_trial_twice_and_finish_the_grid(store_url, tmp_path):
    log = tmp_path / "log"
    batches = list(range(1, 13))
    open_store(store_url).close()
    procs = [_worker(store_url, log, ",".join(map(str, batches)), "--trial-s", "0.3") for _ in range(4)]
    outs = [_finish(p) for p in procs]
    assert sum(o["ran"] for o in outs) == len(batches)
    assert all(o["batches"] == batches and o["failed"] == 0 for o in outs)  # each reports the whole grid
    starts = Counter(e[1] for e in _events(log) if e[0] == "start")
    assert starts == {b: 1 for b in batches}  # each trial ran exactly once
    assert len({e[2] for e in _events(log)}) >= 2  # the grid was shared, not run by one worker
    with open_store(store_url) as s:
        rows = s.rows()
    assert len(rows) == len(batches) and all(r.status == "done" and r.attempts == 1 for r in rows)


def test_a_worker_killed_while_holding_a_claim_does_not_block_the_sweep(store_url, tmp_path):
    """The killed worker claims to be on another machine, so the three others can only wait for its lease."""
    log, lease = tmp_path / "log", 1.5
    batches = ",".join(str(b) for b in range(1, 9))
    dead = _worker(store_url, log, batches, "--hang-batch", "1", "--owner-host", "elsewhere", "--stale-s", str(lease))
    try:
        _wait_for(lambda: ("start", 1) in [e[:2] for e in _events(log)], "the doomed worker to claim batch 1", [dead])
        others = [_worker(store_url, log, batches, "--stale-s", str(lease), "--trial-s", "0.2") for _ in range(3)]
        _wait_for(lambda: any(e[2] != dead.pid for e in _events(log)), "the other workers to start", others)
    finally:
        _kill9(dead)
    outs = [_finish(p) for p in others]
    assert sum(o["ran"] for o in outs) == 8 and all(o["failed"] == 0 for o in outs)
    assert all(o["batches"] == list(range(1, 9)) for o in outs)
    events = _events(log)
    starts = Counter(e[1] for e in events if e[0] == "start")
    assert starts == {1: 2, **{b: 1 for b in range(2, 9)}}  # only the dead worker's trial ran again
    with open_store(store_url) as s:
        rows = {r.spec["trial"]["batch"]: r for r in s.rows()}
    assert all(r.status == "done" for r in rows.values()) and len(rows) == 8
    assert rows[1].attempts == 2 and rows[1].result["pid"] != dead.pid
    assert all(rows[b].attempts == 1 for b in range(2, 9))


# -- PostgreSQL: the schema version and what is not ours --------------------------------------------

@pytest.fixture
def pg_url(pg_server):
    return pg_server.new_database()


def test_postgresql_records_and_checks_its_schema_version(pg_url):
    import psycopg

    open_store(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        meta = dict(conn.execute("SELECT name, value FROM batchpilot_meta").fetchall())
        assert meta == {"application": "batchpilot-trial-store", "schema_version": str(SCHEMA_VERSION)}
        conn.execute("UPDATE batchpilot_meta SET value = %s WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(BatchpilotError, match=rf"newer batchpilot \(store schema {SCHEMA_VERSION + 1}"):
        open_store(pg_url)


def test_postgresql_refuses_a_trials_table_it_did_not_make_untouched(pg_url):
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE batchpilot_trials (id int)")
        conn.execute("INSERT INTO batchpilot_trials VALUES (7)")
    with pytest.raises(BatchpilotError, match="batchpilot did not make"):
        open_store(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT * FROM batchpilot_trials").fetchall() == [(7,)]
        assert conn.execute("SELECT to_regclass('batchpilot_meta')").fetchone()[0] is None


def test_postgresql_reconnects_after_the_server_drops_the_connection(pg_url):
    import psycopg

    with open_store(pg_url) as store:
        assert store.claim("k", "sw", SPEC) == "claimed"
        with psycopg.connect(pg_url, autocommit=True) as admin:  # the server ends the store's session
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = 'batchpilot-sweep' AND pid <> pg_backend_pid()")
        assert store.finish("k", {"x": 1})  # retried on a new connection
        assert store.get("k").result == {"x": 1}
