"""Store fixtures: every backend suite runs on SQLite and on a real PostgreSQL server started here."""

from __future__ import annotations

import pytest

from pg_server import Unavailable, start

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def pg_server():
    """A throwaway PostgreSQL server for the session (skips, with the reason, where none can be started)."""
    try:
        server = start()
    except Unavailable as exc:
        pytest.skip(f"PostgreSQL store tests skipped: {exc}")
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path):
    """A fresh, empty store of each backend: a SQLite file path, or a new database on the test server."""
    if request.param == "sqlite":
        return str(tmp_path / "sweep.db")
    return request.getfixturevalue("pg_server").new_database()
