"""Open a trial store by name: a SQLite file or a PostgreSQL server, behind one interface.

``--store`` takes a path or ``sqlite:///path`` (SQLite, one machine: :class:`~batchpilot.sweep.store.TrialStore`)
or ``postgresql://user[:password]@host[:port]/db`` (many machines:
:class:`~batchpilot.sweep.pgstore.PostgresTrialStore`, needs ``pip install 'batchpilot[postgres]'``). Both are
:class:`~batchpilot.sweep.store.BaseTrialStore`: the runner and the CLI never ask which one they have.
"""

from __future__ import annotations

import os
from typing import Any

from batchpilot.sweep.store import BaseTrialStore, TrialStore, redact_url, store_scheme

__all__ = ["open_store", "is_server_store", "redact_url"]


def is_server_store(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a server store (``postgresql://`` / ``postgres://``) rather than a file."""
    return store_scheme(spec) == "postgresql"


def open_store(spec: str | os.PathLike, *, owner: str | None = None, stale_after_s: float = 120.0,
               **options: Any) -> BaseTrialStore:
    """Open the trial store ``spec`` names.

    Args:
        spec: a path, ``sqlite:///path``, or ``postgresql://user@host[:port]/db``.
        owner: this process's owner id (default ``host:pid:token``).
        stale_after_s: the lease: a running trial whose heartbeat is older than this is claimable again.
        options: backend options (SQLite: ``busy_timeout_s``; PostgreSQL: ``connect_timeout_s``, ``write_retry_s``).

    Raises:
        BatchpilotError: an unsupported scheme, a store that is not a batchpilot store or of a newer schema,
            a server that cannot be reached, or PostgreSQL without its driver.
    """
    if is_server_store(spec):
        from batchpilot.sweep.pgstore import PostgresTrialStore

        return PostgresTrialStore(os.fspath(spec), owner=owner, stale_after_s=stale_after_s, **options)
    return TrialStore(spec, owner=owner, stale_after_s=stale_after_s, **options)
