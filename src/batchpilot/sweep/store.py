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
import math
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import quote

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
APPLICATION_ID = 0x42504C54  # "BPLT" in the SQLite header: this file is a batchpilot trial store
SCHEMA_VERSION = 1
"""The store's layout (``PRAGMA user_version``); a store of a newer layout is refused, not misread."""
COLUMNS = ("key", "sweep_id", "spec", "status", "owner", "heartbeat", "attempts", "started_at", "finished_at",
           "result", "error")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.DOTALL)
POSTGRES_SCHEMES = ("postgresql", "postgres")
ResultCheck = Callable[[dict], "str | None"]


def store_scheme(spec: str | os.PathLike) -> str:
    """``sqlite`` for a path or ``sqlite:///path``, ``postgresql`` for ``postgresql://`` / ``postgres://``,
    else the URL's own scheme (which :func:`~batchpilot.sweep.backends.open_store` refuses)."""
    m = _URL.match(os.fspath(spec))
    if m is None:
        return "sqlite"
    scheme = m.group(1).lower()
    return "postgresql" if scheme in POSTGRES_SCHEMES else scheme


def redact_url(spec: str | os.PathLike) -> str:
    """``spec`` with any password in a URL's user part replaced by ``***`` (for messages and reports)."""
    text = os.fspath(spec)
    m = _URL.match(text)
    if m is None:
        return text
    rest = m.group(2)
    netloc, sep, tail = rest.partition("/")
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    tail = re.sub(r"(?i)(password=)[^&]*", r"\1***", tail)
    return f"{m.group(1)}://{netloc}{sep}{tail}"


def store_path(spec: str | os.PathLike) -> Path:
    """The file of a store given as a path or as ``sqlite:///path`` (``sqlite:////abs/path`` for an absolute one).

    Raises:
        BatchpilotError: any other ``scheme://`` (``postgresql://`` is the server store, opened by
            :func:`~batchpilot.sweep.backends.open_store`; MySQL and others are not supported); the URL's user, password and host are
            not repeated in the message.
    """
    text = os.fspath(spec)
    m = _URL.match(text)
    if m is None:
        return Path(text)
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme in POSTGRES_SCHEMES:
        raise BatchpilotError(f"store URL scheme {scheme}:// is a PostgreSQL store, not a SQLite file; "
                              "open it with batchpilot.sweep.backends.open_store (batchpilot sweep --store does)")
    if scheme != "sqlite":
        raise BatchpilotError(
            f"store URL scheme {scheme}:// is not supported; give a SQLite file on a local disk "
            "(runs/sweep.db or sqlite:///runs/sweep.db) or a PostgreSQL server (postgresql://user@host/db)")
    path = rest[1:] if rest.startswith("/") else ""
    if not path or path == ":memory:" or "?" in path:
        raise BatchpilotError(f"store URL {text!r} must be sqlite:///path/to/sweep.db (three slashes, then a file path; "
                              "four for an absolute path)")
    return Path(path)


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


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def decode_row(r: tuple) -> TrialRow:
    """A stored row as a :class:`TrialRow`; ``ValueError`` naming the bad column when it does not decode."""
    if len(r) != len(COLUMNS):
        raise ValueError(f"{len(r)} columns, expected {len(COLUMNS)}")
    key, sweep_id, spec, status, owner, hb, attempts, started, finished, result, error = r
    for name, value in (("key", key), ("sweep_id", sweep_id), ("spec", spec)):
        if not isinstance(value, str):
            raise ValueError(f"{name} is {type(value).__name__}, expected text")
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    for name, value in (("owner", owner), ("error", error)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} is {type(value).__name__}, expected text")
    for name, value in (("heartbeat", hb), ("started_at", started), ("finished_at", finished)):
        if value is not None and not _is_number(value):
            raise ValueError(f"{name} {value!r} is not a time")
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise ValueError(f"attempts {attempts!r} is not a count")
    try:
        spec_obj = json.loads(spec)
    except ValueError:
        raise ValueError("spec is not JSON") from None
    if not isinstance(spec_obj, dict):
        raise ValueError("spec is not a JSON object")
    result_obj = None
    if result is not None:
        if not isinstance(result, str):
            raise ValueError(f"result is {type(result).__name__}, expected JSON text")
        try:
            result_obj = json.loads(result)
        except ValueError:
            raise ValueError("result is not JSON") from None
        if not isinstance(result_obj, dict):
            raise ValueError("result is not a JSON object")
    if status == "done" and result_obj is None:
        raise ValueError("status done without a result")
    return TrialRow(key, sweep_id, spec_obj, status, owner, hb, attempts, started, finished, result_obj, error)


class BaseTrialStore:
    """What every trial store does: atomic claims with leases, heartbeats, results in one transaction.

    A backend implements :meth:`claim`, :meth:`heartbeat`, :meth:`finish`, :meth:`fail`, :meth:`get`,
    :meth:`rows` and :meth:`close`; the rules that decide a claim (:meth:`_decide`) are shared, so both
    backends reclaim exactly the same rows.

    Attributes:
        owner: this process's owner id (``host:pid:token``).
        stale_after_s: the lease: a ``running`` row whose heartbeat is older than this is reclaimable
            (an owner on this host whose pid is gone is reclaimable at once).
        invalid: rows that did not decode or whose result failed a check: key -> why.
        transient_errors: exceptions a heartbeat may meet and retry on the next beat.
        where: the store's name for messages and reports (a URL's password redacted).
    """

    transient_errors: tuple[type[BaseException], ...] = ()
    where: str = ""

    def __init__(self, *, owner: str | None, stale_after_s: float) -> None:
        if not (isinstance(stale_after_s, (int, float)) and stale_after_s > 0 and math.isfinite(stale_after_s)):
            raise BatchpilotError(f"stale_after_s must be > 0, got {stale_after_s!r}")
        self.owner = owner or make_owner()
        self.stale_after_s = float(stale_after_s)
        self.invalid: dict[str, str] = {}

    # -- the interface --------------------------------------------------------------------
    def claim(self, key: str, sweep_id: str, spec: dict[str, Any], *, check: ResultCheck | None = None) -> str:
        """Try to claim trial ``key``: ``"claimed"`` (run it now), ``"done"`` (skip) or ``"busy"``."""
        raise NotImplementedError

    def heartbeat(self, key: str) -> bool:
        """Refresh the lease of a trial this process owns; ``False`` if it no longer owns it."""
        raise NotImplementedError

    def finish(self, key: str, result: dict[str, Any]) -> bool:
        """Store the result and mark the trial done in one transaction; ``False`` if it was reclaimed."""
        raise NotImplementedError

    def fail(self, key: str, error: str) -> None:
        """Mark a trial this process owns as failed (retried by the next run)."""
        raise NotImplementedError

    def get(self, key: str) -> TrialRow | None:
        """The row for ``key``, or ``None``."""
        raise NotImplementedError

    def rows(self, keys: Iterable[str] | None = None, *, sweep_id: str | None = None) -> list[TrialRow]:
        """Rows for ``keys`` (in that order), or of ``sweep_id``, or all, in insertion order."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the connection."""
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shared rules ---------------------------------------------------------------------
    def _row(self, r: tuple) -> TrialRow | None:
        """Decode a row; a bad one is recorded in :attr:`invalid` and skipped (``None``)."""
        try:
            return decode_row(r)
        except ValueError as exc:
            key = r[0] if r and isinstance(r[0], str) else repr(r[0] if r else None)
            self.invalid[key] = f"row does not decode: {exc}"
            return None

    def _reclaimable(self, owner: str | None, heartbeat: float | None, now: float) -> bool:
        if not isinstance(owner, str) or not _is_number(heartbeat):  # none, or a damaged row
            return True
        alive = _owner_alive_here(owner)
        if alive is False:
            return True
        return now - heartbeat > self.stale_after_s

    def _decide(self, key: str, row: tuple, now: float, check: ResultCheck | None) -> "str | tuple[int, str | None]":
        """For an existing row: ``"done"``, ``"busy"``, or ``(attempts so far, problem or None)`` to claim it."""
        try:
            decoded = decode_row(row)
            problem = check(decoded.result) if check is not None and decoded.status == "done" else None
        except ValueError as exc:
            decoded, problem = None, f"row does not decode: {exc}"
        if problem is None and decoded is not None:
            if decoded.status == "done":
                return "done"
            if decoded.status == "running" and decoded.owner != self.owner and \
                    not self._reclaimable(decoded.owner, decoded.heartbeat, now):
                return "busy"
        else:
            self.invalid[key] = f"{problem}; the trial runs again"
        return (decoded.attempts if decoded is not None else 0, problem)


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


class Heartbeat:
    """Refreshes a claimed trial's heartbeat from a daemon thread while the trial runs.

    Use as a context manager around the trial; ``interval_s`` should be well below the
    store's ``stale_after_s``.
    """

    def __init__(self, store: BaseTrialStore, key: str, interval_s: float = 10.0) -> None:
        self.store, self.key, self.interval_s = store, key, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{key[:8]}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.store.heartbeat(self.key)
            except self.store.transient_errors:  # a busy or unreachable store: the next beat tries again
                pass

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

