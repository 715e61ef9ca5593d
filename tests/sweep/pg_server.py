"""A throwaway PostgreSQL server for the store tests (Debian's ``postgresql`` package: ``initdb`` + ``pg_ctl``).

:func:`start` makes a cluster in a temporary directory, listening on 127.0.0.1 only, with trust auth for the
``batchpilot`` superuser, and returns a :class:`Server`; :meth:`Server.new_database` gives each test its own
empty database. As root (CI), the server runs as the ``postgres`` system user, since PostgreSQL refuses root.

``BATCHPILOT_TEST_POSTGRES_URL`` (an admin URL of a server you run) replaces the throwaway server.
Where neither can be had, :func:`start` raises :class:`Unavailable` with the reason (the tests skip with it).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path


class Unavailable(RuntimeError):
    """No PostgreSQL server can be started or reached here (the message says why)."""


def _bindir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: ``pg_config --bindir``, Debian's layout, or the PATH."""
    candidates = []
    if shutil.which("pg_config"):
        try:
            candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                             timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(re.sub(r"\D", "", p) or 0), reverse=True)
    candidates += versions
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).resolve().parent))
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    admin_url: str
    stop: callable = field(default=lambda: None)
    made: list[str] = field(default_factory=list)

    def url(self, database: str) -> str:
        base, _, _ = self.admin_url.rpartition("/")
        return f"{base}/{database}"

    def new_database(self) -> str:
        """A fresh empty database's URL."""
        import psycopg

        name = f"bp_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.made.append(name)
        return self.url(name)


def start() -> Server:
    try:
        import psycopg
    except ImportError:
        raise Unavailable("the psycopg driver is not installed (pip install -e '.[postgres]')") from None
    given = os.environ.get("BATCHPILOT_TEST_POSTGRES_URL")
    if given:
        try:
            psycopg.connect(given, connect_timeout=5).close()
        except psycopg.Error as exc:
            raise Unavailable(f"BATCHPILOT_TEST_POSTGRES_URL cannot be reached: {str(exc).strip().splitlines()[0]}") from None
        return Server(given)
    bindir = _bindir()
    if bindir is None:
        raise Unavailable("no PostgreSQL server binaries (initdb, pg_ctl) on this machine: apt-get install postgresql, "
                          "or set BATCHPILOT_TEST_POSTGRES_URL")
    user = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise Unavailable("running as root and there is no 'postgres' user to run the server as") from None
        user = "postgres"
    tmp = Path(tempfile.mkdtemp(prefix="batchpilot-pg-"))
    if user:
        shutil.chown(tmp, user=user)
    data, log = tmp / "data", tmp / "server.log"

    def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(bindir / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=timeout,
                              user=user, cwd=tmp, env={**os.environ, "LC_ALL": "C"})

    def stop() -> None:
        if data.exists():
            try:
                run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop", timeout=30)
            except (OSError, subprocess.SubprocessError):
                pass
        shutil.rmtree(tmp, ignore_errors=True)

    try:
        r = run("initdb", "-D", str(data), "-U", "batchpilot", "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C")
        if r.returncode != 0:
            raise Unavailable(f"initdb failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        for attempt in range(3):  # another process may take the free port first
            port = _free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={tmp} -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100 -c shared_buffers=16MB")
            r = run("pg_ctl", "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", "60", "start", timeout=90)
            if r.returncode == 0:
                break
        else:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise Unavailable(f"pg_ctl start failed: {r.stderr.strip() or r.stdout.strip()} {' | '.join(tail)}")
        server = Server(f"postgresql://batchpilot@127.0.0.1:{port}/postgres", stop=stop)
        psycopg.connect(server.admin_url, connect_timeout=10).close()
        return server
    except Unavailable:
        stop()
        raise
    except (OSError, subprocess.SubprocessError, psycopg.Error) as exc:
        stop()
        raise Unavailable(f"the test server could not be started: {exc}") from None
