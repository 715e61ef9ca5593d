"""The PostgreSQL trial store: one sweep on many machines against one database server.

Same rows, same claim rules and same interface as the SQLite store (:class:`~batchpilot.sweep.store.TrialStore`;
both are :class:`~batchpilot.sweep.store.BaseTrialStore`), on psycopg 3 (``pip install 'batchpilot[postgres]'``).

- **Claims are atomic across machines.** A claim is one transaction: ``SELECT ... FOR UPDATE SKIP LOCKED`` on
  the trial's row (a row another worker is deciding about right now is ``busy``, never waited on), or an
  ``INSERT ... ON CONFLICT DO NOTHING`` for a trial nobody has started; the decision (done / busy / claim) is
  the shared one of :meth:`BaseTrialStore._decide`, and the row is updated before the transaction commits.
- **Leases with a heartbeat.** A running trial's ``heartbeat`` is refreshed by its worker
  (:class:`~batchpilot.sweep.store_base.Heartbeat`); a row whose heartbeat is older than ``stale_after_s`` (the lease)
  is claimable again, so a worker that died, or a machine that lost power, does not block the sweep. An owner
  on the claiming machine whose pid is gone is reclaimed at once. Every time (heartbeat, start, finish) is the
  **server's** clock (``clock_timestamp()``), so machines whose clocks disagree still agree on a lease.
- **Results in one transaction**: the result JSON and ``status = 'done'`` are one ``UPDATE``, made only while
  this worker still owns the row; a worker whose lease was taken over has its late result dropped.
- **Schema version checked on open.** The store is two tables in the connection's schema (the first of its
  ``search_path``; pick another with ``?options=-csearch_path%3Dmyschema``): ``batchpilot_trials`` and
  ``batchpilot_meta`` (``application`` = :data:`APPLICATION`, ``schema_version``). Creating or checking them
  happens under a transaction-level advisory lock, so workers starting together create them once. A
  ``batchpilot_trials`` table without the meta table (not ours), or a newer schema, is refused untouched.

A lost connection is re-opened on the next call; a result that could not be written is retried for a while
(the write is idempotent), so a server restart during a trial loses nothing.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterable

from batchpilot.errors import BatchpilotError
from batchpilot.sweep.store_base import (COLUMNS, SCHEMA_VERSION, BaseTrialStore, ResultCheck, TrialRow, redact_url)

APPLICATION = "batchpilot-trial-store"
TABLE = "batchpilot_trials"
META = "batchpilot_meta"
_LOCK_ID = 0x42504C54  # advisory lock key ("BPLT") held while the tables are checked or created
_COLS = ", ".join(COLUMNS)
_NOW = "extract(epoch from clock_timestamp())::double precision"
SCHEMA = f"""
CREATE TABLE {META} (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE {TABLE} (
    key TEXT PRIMARY KEY,
    seq BIGSERIAL NOT NULL,
    sweep_id TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    owner TEXT,
    heartbeat DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    result TEXT,
    error TEXT
);
CREATE INDEX {TABLE}_by_sweep ON {TABLE} (sweep_id, seq)
"""


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise BatchpilotError("a postgresql:// store needs the psycopg driver: pip install 'batchpilot[postgres]' "
                              "(or pip install 'psycopg[binary]')") from None
    return psycopg


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class PostgresTrialStore(BaseTrialStore):
    """A trial store on a PostgreSQL server, safe for many processes on many machines at once.

    Args:
        url: ``postgresql://user[:password]@host[:port]/db`` (any libpq connection URL; a password may also
            come from ``PGPASSWORD`` or ``~/.pgpass``).
        owner: this process's owner id (default :func:`~batchpilot.sweep.store_base.make_owner`).
        stale_after_s: the lease: a running trial whose heartbeat is older than this is claimable again.
        connect_timeout_s: how long to wait for the server.
        write_retry_s: how long a result (:meth:`finish`) is retried while the server is unreachable.
    """

    def __init__(self, url: str, *, owner: str | None = None, stale_after_s: float = 120.0,
                 connect_timeout_s: float = 10.0, write_retry_s: float = 60.0) -> None:
        super().__init__(owner=owner, stale_after_s=stale_after_s)
        self.psycopg = _psycopg()
        self.url = url
        self.where = redact_url(url)
        self.connect_timeout_s = connect_timeout_s
        self.write_retry_s = write_retry_s
        self.transient_errors = (self.psycopg.OperationalError, self.psycopg.InterfaceError)
        self._lock = threading.RLock()  # one connection, shared with the heartbeat thread
        self._conn = None
        self._closed = False
        try:
            self._connect()
        except self.psycopg.Error as exc:
            raise BatchpilotError(f"store {self.where}: cannot connect to the PostgreSQL server: {_one_line(exc)}") from None
        try:
            self._write(self._create)
        except BatchpilotError:
            self.close()
            raise
        except self.psycopg.Error as exc:
            self.close()
            raise BatchpilotError(f"store {self.where} is not a usable batchpilot PostgreSQL store: {_one_line(exc)}") from None

    # -- connection -----------------------------------------------------------------------
    def _connect(self) -> None:
        self._conn = self.psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, round(self.connect_timeout_s)),
                                          application_name="batchpilot-sweep")

    def _ensure(self):
        if self._closed:
            raise BatchpilotError(f"store {self.where} is closed")
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                try:
                    self._conn.close()
                except Exception:  # noqa: BLE001 - it is gone either way
                    pass
            self._connect()
        return self._conn

    def _write(self, fn):
        """Run ``fn(conn)`` in one transaction (commit on return, roll back on any exception)."""
        with self._lock:
            conn = self._ensure()
            with conn.transaction():
                return fn(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()

    # -- opening --------------------------------------------------------------------------
    def _create(self, conn) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        meta, trials = conn.execute("SELECT to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL",
                                    (META, TABLE)).fetchone()
        schema = conn.execute("SELECT current_schema()").fetchone()[0]
        if meta:
            found = dict(conn.execute(f"SELECT name, value FROM {META}").fetchall())
            if found.get("application") != APPLICATION:
                raise BatchpilotError(f"store {self.where}: table {schema}.{META} is not a batchpilot store's "
                                      f"(application {found.get('application')!r}); use another database or schema")
            try:
                version = int(found.get("schema_version", ""))
            except ValueError:
                raise BatchpilotError(f"store {self.where}: {schema}.{META} has no readable schema_version") from None
            if version > SCHEMA_VERSION:
                raise BatchpilotError(f"store {self.where} was written by a newer batchpilot (store schema {version}; "
                                      f"this version reads up to {SCHEMA_VERSION}): upgrade batchpilot")
            if not trials:
                raise BatchpilotError(f"store {self.where}: {schema}.{META} exists without {TABLE}; the store is damaged")
            return
        if trials:
            raise BatchpilotError(f"store {self.where}: a table {schema}.{TABLE} exists that batchpilot did not make "
                                  f"(no {META}); use another database or schema")
        if schema is None:
            raise BatchpilotError(f"store {self.where}: no schema to create the store in (the search_path is empty)")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"INSERT INTO {META} (name, value) VALUES ('application', %s), ('schema_version', %s)",
                     (APPLICATION, str(SCHEMA_VERSION)))

    # -- claims ---------------------------------------------------------------------------
    def claim(self, key: str, sweep_id: str, spec: dict[str, Any], *, check: ResultCheck | None = None) -> str:
        spec_text = json.dumps(spec, sort_keys=True)

        def txn(conn) -> str:
            now = conn.execute(f"SELECT {_NOW}").fetchone()[0]
            row = conn.execute(f"SELECT {_COLS} FROM {TABLE} WHERE key = %s FOR UPDATE SKIP LOCKED", (key,)).fetchone()
            if row is None:
                inserted = conn.execute(
                    f"INSERT INTO {TABLE} (key, sweep_id, spec, status, owner, heartbeat, attempts, started_at)"
                    " VALUES (%s, %s, %s, 'running', %s, %s, 1, %s) ON CONFLICT (key) DO NOTHING RETURNING key",
                    (key, sweep_id, spec_text, self.owner, now, now)).fetchone()
                return "claimed" if inserted is not None else "busy"  # else: another worker holds the row right now
            decision = self._decide(key, row, now, check)
            if isinstance(decision, str):
                return decision
            attempts, problem = decision
            conn.execute(
                f"UPDATE {TABLE} SET status = 'running', owner = %s, heartbeat = %s, attempts = %s, started_at = %s,"
                " finished_at = NULL, result = NULL, error = %s, sweep_id = %s, spec = %s WHERE key = %s",
                (self.owner, now, attempts + 1, now, None if problem is None else f"re-run: {problem}"[:2000],
                 sweep_id, spec_text, key))
            return "claimed"

        return self._retrying(txn)

    def heartbeat(self, key: str) -> bool:
        def txn(conn) -> bool:
            cur = conn.execute(f"UPDATE {TABLE} SET heartbeat = {_NOW} WHERE key = %s AND owner = %s AND status = 'running'",
                               (key, self.owner))
            return cur.rowcount == 1

        return self._write(txn)

    def finish(self, key: str, result: dict[str, Any]) -> bool:
        payload = json.dumps(result, sort_keys=True, allow_nan=False)

        def txn(conn) -> bool:
            cur = conn.execute(
                f"UPDATE {TABLE} SET status = 'done', result = %s, finished_at = {_NOW}, heartbeat = {_NOW}"
                " WHERE key = %s AND owner = %s AND status = 'running'", (payload, key, self.owner))
            if cur.rowcount == 1:
                return True
            # a retry after a commit whose answer was lost finds its own result already there
            row = conn.execute(f"SELECT status, owner, result FROM {TABLE} WHERE key = %s", (key,)).fetchone()
            return row is not None and row[0] == "done" and row[1] == self.owner and row[2] == payload

        return self._retrying(txn)

    def fail(self, key: str, error: str) -> None:
        self._retrying(lambda conn: conn.execute(
            f"UPDATE {TABLE} SET status = 'failed', error = %s, finished_at = {_NOW} WHERE key = %s AND owner = %s",
            (error[:2000], key, self.owner)))

    def _retrying(self, fn, write: bool = True):
        """A call that must not be lost to a dropped connection or a restarting server: retried (reconnecting)
        for ``write_retry_s``, then one line (:class:`BatchpilotError`). Every write retried here is idempotent:
        it only touches a row this owner holds, and :meth:`finish` recognises its own earlier commit."""
        deadline = time.monotonic() + self.write_retry_s
        delay = 0.5
        while True:
            try:
                return self._write(fn) if write else self._read_now(fn)
            except self.transient_errors as exc:
                if time.monotonic() + delay > deadline:
                    raise BatchpilotError(f"store {self.where}: the PostgreSQL server did not answer for "
                                          f"{self.write_retry_s:g} s: {_one_line(exc)}") from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- reads ----------------------------------------------------------------------------
    def _read_now(self, fn):
        with self._lock:
            return fn(self._ensure())

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self._retrying(lambda conn: conn.execute(sql, params).fetchall(), write=False)

    def get(self, key: str) -> TrialRow | None:
        rs = self._read(f"SELECT {_COLS} FROM {TABLE} WHERE key = %s", (key,))
        return self._row(rs[0]) if rs else None

    def rows(self, keys: Iterable[str] | None = None, *, sweep_id: str | None = None) -> list[TrialRow]:
        if keys is not None:
            wanted = list(dict.fromkeys(keys))
            found = {r[0]: r for r in self._read(f"SELECT {_COLS} FROM {TABLE} WHERE key = ANY(%s)", (wanted,))}
            rs = [found[k] for k in wanted if k in found]
        elif sweep_id is not None:
            rs = self._read(f"SELECT {_COLS} FROM {TABLE} WHERE sweep_id = %s ORDER BY seq", (sweep_id,))
        else:
            rs = self._read(f"SELECT {_COLS} FROM {TABLE} ORDER BY seq")
        return [row for row in (self._row(r) for r in rs) if row is not None]
