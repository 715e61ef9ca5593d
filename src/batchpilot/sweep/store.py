"""The trial store: an embedded SQLite database (WAL) that makes a sweep resumable and shareable.

Why stdlib ``sqlite3`` and not Optuna's RDB storage: a sweep is a fixed grid of trials, and
the store must guarantee that two processes never run the same trial. Optuna's
``GridSampler`` documents that concurrent workers "will occasionally suggest the same
parameter configuration", so the grid can run twice; it also adds a dependency (Optuna and
SQLAlchemy) for a handful of rows. Here a trial is a row keyed by a hash of everything
that defines it, and a process *claims* the row inside one ``BEGIN IMMEDIATE``
transaction (SQLite takes the write lock first, so the check-then-set is atomic).

Lifecycle of a row: ``running`` (claimed, with ``owner`` = ``host:pid:token`` and a
``heartbeat`` refreshed by the runner) then ``done`` (the result JSON is written in the same
transaction that marks it done) or ``failed`` (an exception; retried on the next run). A
``kill -9`` leaves the row ``running``; it is reclaimed when its owner is on this host and its
pid is gone, or when its heartbeat is older than ``stale_after_s`` (owners on other hosts).
WAL with ``synchronous=FULL`` makes every committed trial survive a killed process.

Scope: processes on one machine (or containers sharing a local disk). SQLite's locking is not
reliable over network file systems (NFS/SMB), so a sweep across machines needs a server
database; this store does not speak one yet. The SQL is plain (one table, ``BEGIN IMMEDIATE``
becomes ``SELECT ... FOR UPDATE`` on PostgreSQL), and owners already carry their hostname and a
heartbeat for exactly that case.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from batchpilot.errors import BatchpilotError

SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY,
    sweep_id TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    owner TEXT,
    heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    finished_at REAL,
    result TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS trials_by_sweep ON trials (sweep_id);
"""
STATUSES = ("running", "done", "failed")


@dataclass(frozen=True)
class TrialRow:
    """One stored trial: its key, spec and state; ``result`` is the decoded JSON or ``None``."""

    key: str
    sweep_id: str
    spec: dict
    status: str
    owner: str | None
    heartbeat: float | None
    attempts: int
    started_at: float | None
    finished_at: float | None
    result: dict | None
    error: str | None


def make_owner() -> str:
    """An owner id for this process: ``hostname:pid:random`` (the token tells a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_alive_here(owner: str) -> bool | None:
    """``False`` if ``owner`` is a process on this host that no longer exists, ``True`` if it
    exists, ``None`` if it lives on another host (only its heartbeat can tell)."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class TrialStore:
    """A SQLite trial store (one file, WAL mode), safe for several processes at once.

    Args:
        path: the database file (created with its parent directory if missing).
        owner: this process's owner id (default :func:`make_owner`).
        stale_after_s: a ``running`` row whose heartbeat is older than this is reclaimable.
        busy_timeout_s: how long a write waits for another process's lock.
    """

    def __init__(self, path: str | Path, *, owner: str | None = None, stale_after_s: float = 120.0,
                 busy_timeout_s: float = 60.0) -> None:
        if not stale_after_s > 0:
            raise BatchpilotError(f"stale_after_s must be > 0, got {stale_after_s!r}")
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise BatchpilotError(f"store {str(self.path)!r} is a directory; give a file such as sweep.db")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.owner = owner or make_owner()
        self.stale_after_s = stale_after_s
        self._lock = threading.Lock()  # one connection, shared with the heartbeat thread
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise BatchpilotError(f"store {str(self.path)!r} is not a batchpilot SQLite store: {exc}") from exc

    # -- plumbing -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "TrialStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, fn):
        """Run ``fn(conn)`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (atomic against other processes)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return out

    @staticmethod
    def _row(r: tuple) -> TrialRow:
        key, sweep_id, spec, status, owner, hb, attempts, started, finished, result, error = r
        return TrialRow(key, sweep_id, json.loads(spec), status, owner, hb, attempts, started, finished,
                        json.loads(result) if result is not None else None, error)

    # -- claims ---------------------------------------------------------------------------
    def _reclaimable(self, owner: str | None, heartbeat: float | None, now: float) -> bool:
        if owner is None or heartbeat is None:
            return True
        alive = _owner_alive_here(owner)
        if alive is False:
            return True
        return now - heartbeat > self.stale_after_s

    def claim(self, key: str, sweep_id: str, spec: dict[str, Any]) -> str:
        """Try to claim trial ``key`` for this process.

        Returns:
            ``"claimed"`` (run it now), ``"done"`` (already finished: skip), or ``"busy"``
            (another live process is running it).
        """

        def txn(conn: sqlite3.Connection) -> str:
            now = time.time()
            row = conn.execute("SELECT status, owner, heartbeat FROM trials WHERE key = ?", (key,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO trials (key, sweep_id, spec, status, owner, heartbeat, attempts, started_at)"
                    " VALUES (?, ?, ?, 'running', ?, ?, 1, ?)",
                    (key, sweep_id, json.dumps(spec, sort_keys=True), self.owner, now, now))
                return "claimed"
            status, owner, heartbeat = row
            if status == "done":
                return "done"
            if status == "running" and owner != self.owner and not self._reclaimable(owner, heartbeat, now):
                return "busy"
            conn.execute(
                "UPDATE trials SET status = 'running', owner = ?, heartbeat = ?, attempts = attempts + 1,"
                " started_at = ?, error = NULL, sweep_id = ? WHERE key = ?",
                (self.owner, now, now, sweep_id, key))
            return "claimed"

        return self._write(txn)

    def heartbeat(self, key: str) -> bool:
        """Refresh the heartbeat of a trial this process owns; ``False`` if it no longer owns it."""

        def txn(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("UPDATE trials SET heartbeat = ? WHERE key = ? AND owner = ? AND status = 'running'",
                               (time.time(), key, self.owner))
            return cur.rowcount == 1

        return self._write(txn)

    def finish(self, key: str, result: dict[str, Any]) -> bool:
        """Store the result and mark the trial done (one transaction). ``False`` if another
        process reclaimed the trial meanwhile (its result then wins; ours is dropped)."""
        payload = json.dumps(result, sort_keys=True, allow_nan=False)

        def txn(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE trials SET status = 'done', result = ?, finished_at = ?, heartbeat = ?"
                " WHERE key = ? AND owner = ? AND status = 'running'",
                (payload, time.time(), time.time(), key, self.owner))
            return cur.rowcount == 1

        return self._write(txn)

    def fail(self, key: str, error: str) -> None:
        """Mark a trial this process owns as failed (it is retried by the next run)."""
        self._write(lambda conn: conn.execute(
            "UPDATE trials SET status = 'failed', error = ?, finished_at = ? WHERE key = ? AND owner = ?",
            (error[:2000], time.time(), key, self.owner)))

    # -- reads ----------------------------------------------------------------------------
    def get(self, key: str) -> TrialRow | None:
        """The row for ``key``, or ``None``."""
        with self._lock:
            r = self._conn.execute("SELECT * FROM trials WHERE key = ?", (key,)).fetchone()
        return self._row(r) if r is not None else None

    def rows(self, keys: Iterable[str] | None = None, *, sweep_id: str | None = None) -> list[TrialRow]:
        """Rows for ``keys`` (in that order, missing ones skipped), or all rows of ``sweep_id``, or all rows."""
        with self._lock:
            if keys is not None:
                found = {}
                for k in keys:
                    r = self._conn.execute("SELECT * FROM trials WHERE key = ?", (k,)).fetchone()
                    if r is not None:
                        found[k] = self._row(r)
                return list(found.values())
            if sweep_id is not None:
                rs = self._conn.execute("SELECT * FROM trials WHERE sweep_id = ? ORDER BY rowid", (sweep_id,)).fetchall()
            else:
                rs = self._conn.execute("SELECT * FROM trials ORDER BY rowid").fetchall()
        return [self._row(r) for r in rs]


class Heartbeat:
    """Refreshes a claimed trial's heartbeat from a daemon thread while the trial runs.

    Use as a context manager around the trial; ``interval_s`` should be well below the
    store's ``stale_after_s``.
    """

    def __init__(self, store: TrialStore, key: str, interval_s: float = 10.0) -> None:
        self.store, self.key, self.interval_s = store, key, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{key[:8]}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.store.heartbeat(self.key)
            except sqlite3.Error:  # a busy store: the next beat tries again
                pass

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
