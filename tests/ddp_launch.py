"""Helper for the DDP tests: run ``torch.distributed.run`` (torchrun) with a timeout, so a hang fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TIMEOUT_S = 240


def torchrun(args: list[str], *, nproc: int = 2, max_restarts: int = 0, env: dict | None = None,
             timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node N ... args`` on gloo ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--max-restarts", str(max_restarts), *args]
    return run(cmd, env=env, timeout=timeout)


def run(cmd: list[str], *, env: dict | None = None, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``cmd`` with its output in files; on timeout kill it and every process it started, and fail.

    (torchrun starts its ranks in sessions of their own, so killing its process group is not enough.)
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=full_env)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [*_descendants(proc.pid), proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            err.seek(0)
            pytest.fail(f"{' '.join(cmd)} hung for {timeout} s; stderr tail:\n{err.read()[-3000:]}")
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def _descendants(root: int) -> list[int]:
    """Every live descendant of process ``root`` (from /proc), children first."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [root]
    while frontier:
        kids = [pid for pid, ppid in parents.items() if ppid in frontier]
        found.extend(kids)
        frontier = kids
    return found


def json_out(proc: subprocess.CompletedProcess) -> dict:
    """The one JSON document on stdout (fails if the ranks printed more than one)."""
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)
