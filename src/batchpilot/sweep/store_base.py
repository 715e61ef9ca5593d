"""What every trial store shares, whatever its backend: the row (:class:`TrialRow`, :func:`decode_row`), the
claim rules with leases (:class:`BaseTrialStore`), owner ids, the heartbeat thread, and store names
(paths and URLs, passwords redacted).

The SQLite backend is :mod:`batchpilot.sweep.store`, the PostgreSQL one :mod:`batchpilot.sweep.pgstore`.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from batchpilot.errors import BatchpilotError

STATUSES = ("running", "done", "failed")
SCHEMA_VERSION = 1
"""The store's layout (``PRAGMA user_version``); a store of a newer layout is refused, not misread."""
COLUMNS = ("key", "sweep_id", "spec", "status", "owner", "heartbeat", "attempts", "started_at", "finished_at",
           "result", "error")
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
