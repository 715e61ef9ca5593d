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
reliable over network file systems (NFS/SMB), so a sweep across machines uses the PostgreSQL store
(:mod:`batchpilot.sweep.pgstore`, ``--store postgresql://user@host/db``): the same rows and the same
claim rules behind one interface (:class:`BaseTrialStore`); :func:`~batchpilot.sweep.backends.open_store` picks the backend from
the store's name. ``sqlite:///path`` and plain paths are SQLite; any other ``scheme://`` is refused
with a clear error.

What it opens: a new or empty file (made a store), or a batchpilot store, known by the SQLite header's
``application_id`` (:data:`APPLICATION_ID`) and ``user_version`` (:data:`SCHEMA_VERSION`); stores written
before those were recorded (one ``trials`` table of this layout) are adopted. Anything else, such as
another application's database or a text file, is refused before anything is written to it. Rows are
checked as they are read: a row that does not decode (a hand-edited or damaged one) is skipped and
reported in :attr:`TrialStore.invalid`, and :meth:`TrialStore.claim` runs a trial again whose stored
result does not decode or fails the caller's check.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

from batchpilot.errors import BatchpilotError
from batchpilot.sweep.store_base import (  # noqa: F401 - re-exported: store.X names stay public
    COLUMNS, POSTGRES_SCHEMES, SCHEMA_VERSION, STATUSES, BaseTrialStore, Heartbeat, ResultCheck, TrialRow, decode_row,
    make_owner, redact_url, store_path, store_scheme)

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
APPLICATION_ID = 0x42504C54  # "BPLT" in the SQLite header: this file is a batchpilot trial store
_SQLITE_MAGIC = b"SQLite format 3\x00"


class TrialStore(BaseTrialStore):
    """A SQLite trial store (one file, WAL mode), safe for several processes at once.

    Args:
        path: the database file (created with its parent directory if missing), or ``sqlite:///path``.
        owner: this process's owner id (default :func:`make_owner`).
        stale_after_s: a ``running`` row whose heartbeat is older than this is reclaimable.
        busy_timeout_s: how long a write waits for another process's lock.
    """

    def __init__(self, path: str | Path, *, owner: str | None = None, stale_after_s: float = 120.0,
                 busy_timeout_s: float = 60.0) -> None:
        super().__init__(owner=owner, stale_after_s=stale_after_s)
        self.path = store_path(path)
        self.where = str(self.path)
        self._lock = threading.Lock()  # one connection, shared with the heartbeat thread
        name = repr(str(self.path))
        if self._inspect() == "sqlite":
            self._check_foreign()  # read-only: a file that is not ours is refused untouched
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BatchpilotError(f"store {name}: cannot create its directory ({exc.strerror or exc})") from None
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None,
                                         check_same_thread=False)
        except sqlite3.Error as exc:
            raise BatchpilotError(f"store {name} cannot be opened: {exc}") from None
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._write(self._create)
        except BatchpilotError:
            self._conn.close()
            raise
        except sqlite3.Error as exc:
            self._conn.close()
            raise BatchpilotError(f"store {name} is not a usable batchpilot SQLite store: {exc}") from None

    # -- opening --------------------------------------------------------------------------
    def _inspect(self) -> str:
        """``new`` (absent or empty) or ``sqlite`` (a SQLite file); anything else is refused."""
        name = repr(str(self.path))
        if self.path.is_dir():
            raise BatchpilotError(f"store {name} is a directory; give a file such as sweep.db")
        try:
            if not self.path.exists() or self.path.stat().st_size == 0:
                return "new"
            with open(self.path, "rb") as fh:
                head = fh.read(len(_SQLITE_MAGIC))
        except OSError as exc:
            raise BatchpilotError(f"store {name} cannot be read: {exc.strerror or exc}") from None
        if head != _SQLITE_MAGIC:
            raise BatchpilotError(f"store {name} is not a batchpilot SQLite store (not a SQLite database at all); "
                                  "give a new file name or an existing sweep store")
        return "sqlite"

    def _check_foreign(self) -> None:
        """Refuse, without writing to it, a SQLite file that is not a batchpilot store of a layout we read."""
        name = repr(str(self.path))
        try:
            conn = sqlite3.connect(f"file:{quote(str(self.path.resolve()))}?mode=ro", uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise BatchpilotError(f"store {name} cannot be opened: {exc}") from None
        try:
            kind = self._kind(conn)
        except sqlite3.Error as exc:
            raise BatchpilotError(f"store {name} is not a readable SQLite database: {exc}") from None
        finally:
            conn.close()
        if kind not in ("ours", "legacy", "empty"):
            raise BatchpilotError(f"store {name} {kind}; give a new file name or a batchpilot sweep store")

    @staticmethod
    def _kind(conn: sqlite3.Connection) -> str:
        """``ours``, ``legacy`` (a store from before the version was recorded), ``empty``, or why it is not ours."""
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        if app_id == APPLICATION_ID:
            if version > SCHEMA_VERSION:
                return (f"was written by a newer batchpilot (store schema {version}; this version reads up to "
                        f"{SCHEMA_VERSION}): upgrade batchpilot")
            return "ours"
        if app_id == 0 and not tables:
            return "empty"
        if app_id == 0 and version == 0 and tables == ["trials"]:
            columns = tuple(r[1] for r in conn.execute("PRAGMA table_info(trials)"))
            if columns == COLUMNS:
                return "legacy"
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        return (f"is a SQLite database of another application (application_id {app_id:#x}, "
                f"tables: {shown or 'none'}), not a batchpilot trial store")

    def _create(self, conn: sqlite3.Connection) -> None:
        """Inside the write lock: make a new store, adopt a legacy one, or check ours (another process may have
        created it since :meth:`_check_foreign`)."""
        kind = self._kind(conn)
        if kind == "ours":
            return
        if kind not in ("empty", "legacy"):
            raise BatchpilotError(f"store {str(self.path)!r} {kind}")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- plumbing -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

    transient_errors = (sqlite3.Error,)

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

    # -- claims ---------------------------------------------------------------------------
    def claim(self, key: str, sweep_id: str, spec: dict[str, Any], *, check: ResultCheck | None = None) -> str:
        """Try to claim trial ``key`` for this process.

        Args:
            check: ``check(result) -> None`` if a stored result is usable, else why not; a done trial
                whose result does not decode or fails it is claimed again (why: :attr:`invalid`).

        Returns:
            ``"claimed"`` (run it now), ``"done"`` (already finished: skip), or ``"busy"``
            (another live process is running it).
        """

        def txn(conn: sqlite3.Connection) -> str:
            now = time.time()
            row = conn.execute("SELECT * FROM trials WHERE key = ?", (key,)).fetchone()
            spec_text = json.dumps(spec, sort_keys=True)
            if row is None:
                conn.execute(
                    "INSERT INTO trials (key, sweep_id, spec, status, owner, heartbeat, attempts, started_at)"
                    " VALUES (?, ?, ?, 'running', ?, ?, 1, ?)",
                    (key, sweep_id, spec_text, self.owner, now, now))
                return "claimed"
            decision = self._decide(key, row, now, check)
            if isinstance(decision, str):
                return decision
            attempts, problem = decision
            conn.execute(
                "UPDATE trials SET status = 'running', owner = ?, heartbeat = ?, attempts = ?, started_at = ?,"
                " finished_at = NULL, result = NULL, error = ?, sweep_id = ?, spec = ? WHERE key = ?",
                (self.owner, now, attempts + 1, now, None if problem is None else f"re-run: {problem}"[:2000],
                 sweep_id, spec_text, key))
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
        return self._row(r) if r is not None else None  # (a row that does not decode: None, see invalid)

    def rows(self, keys: Iterable[str] | None = None, *, sweep_id: str | None = None) -> list[TrialRow]:
        """Rows for ``keys`` (in that order, missing ones skipped), or all rows of ``sweep_id``, or all rows.

        A row that does not decode is skipped and recorded in :attr:`invalid`."""
        with self._lock:
            if keys is not None:
                found = {}
                for k in keys:
                    r = self._conn.execute("SELECT * FROM trials WHERE key = ?", (k,)).fetchone()
                    if r is not None:
                        found[k] = r
                rs = list(found.values())
            elif sweep_id is not None:
                rs = self._conn.execute("SELECT * FROM trials WHERE sweep_id = ? ORDER BY rowid", (sweep_id,)).fetchall()
            else:
                rs = self._conn.execute("SELECT * FROM trials ORDER BY rowid").fetchall()
        return [row for row in (self._row(r) for r in rs) if row is not None]
