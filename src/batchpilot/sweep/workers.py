"""Several local worker processes on one trial store (``batchpilot sweep --workers N``).

Each worker is a fresh process (``spawn``: no state shared with the parent but the store) that runs
:func:`~batchpilot.sweep.runner.run_sweep` on the same store with ``config.threads`` torch threads (its share of
the machine). The store's atomic claims share the grid among them, exactly as among workers on other machines
against one PostgreSQL store; a worker that dies leaves its trial to the others (at once on this host, after
the lease elsewhere). The parent waits for them and reads every trial back from the store (:func:`collect`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

from batchpilot.errors import BatchpilotError
from batchpilot.sweep.runner import SweepConfig, SweepOutcome, TrialSpec, result_problem
from batchpilot.sweep.store_base import BaseTrialStore

EXIT_WORKER_INTERRUPTED = 130


def cpu_share(workers: int) -> int:
    """Torch threads per worker: the CPUs this process may use, split evenly (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, workers))


@dataclass(frozen=True)
class WorkerReport:
    """What one worker did: trials it ran, found done, saw fail; ``error`` if it stopped on an error."""

    index: int
    pid: int | None
    exitcode: int | None
    ran: int = 0
    skipped: int = 0
    failed: tuple[dict, ...] = ()
    error: str | None = None


def _line(index: int, total: int, kind: str, info: dict) -> str | None:
    t: TrialSpec | None = info.get("trial")
    what = f"batch {t.batch} lr×{t.lr_multiplier:g} seed {t.seed} ({t.tag})" if t is not None else ""
    head = f"worker {index + 1}/{total}:"
    if kind == "start":
        return f"{head} {what}: started"
    if kind == "finish":
        r = info["result"]
        return (f"{head} {what}: {r.get('status')}, steps→target {r.get('steps_to_target')}, "
                f"{r.get('metric_name', 'metric')} {r.get('val_metric')}")
    if kind == "fail":
        return f"{head} {what}: failed: {info['error']}"
    if kind == "invalid":
        return f"{head} store: {what or 'row ' + info['key'][:12]}: {info['reason']}"
    return None


def _worker(index: int, total: int, config: SweepConfig, store_spec: str, lease_s: float, heartbeat_s: float,
            poll_s: float, results, log=None) -> None:
    """A worker process's body: run the sweep on the store, report the counts on ``results``."""
    from batchpilot.sweep.backends import open_store
    from batchpilot.sweep.runner import run_sweep

    def on_event(kind: str, info: dict) -> None:
        line = _line(index, total, kind, info)
        if line is not None:
            print(line, file=sys.stderr, flush=True)

    code = 0
    report = {"index": index, "pid": os.getpid()}
    try:
        extra = {}
        if log is not None:  # --log: each trial's steps as its own run
            from batchpilot.sweep.trial_log import logged_execute

            extra = {"execute": logged_execute(*log), "check_result": result_problem}
        with open_store(store_spec, stale_after_s=lease_s) as store:
            out = run_sweep(config, store, on_event=on_event, heartbeat_s=heartbeat_s, poll_s=poll_s, **extra)
        report.update(ran=out.ran, skipped=out.skipped, failed=list(out.failed))
    except KeyboardInterrupt:
        report["error"] = "interrupted"
        code = EXIT_WORKER_INTERRUPTED
    except BatchpilotError as exc:
        report["error"] = " ".join(str(exc).split())
        code = 2
    except Exception as exc:  # noqa: BLE001 - reported to the parent, with where it happened
        report["error"] = f"{type(exc).__name__}: {exc} ({traceback.format_exc(limit=3).strip().splitlines()[-1]})"
        code = 1
    try:
        results.put(report)
        results.close()
        results.join_thread()  # the report reaches the pipe before the process ends
    except Exception:  # noqa: BLE001 - the parent is gone; the store has everything
        pass
    sys.exit(code)


def run_workers(config: SweepConfig, store_spec: str, workers: int, *, lease_s: float = 120.0,
                heartbeat_s: float | None = None, poll_s: float = 2.0,
                on_started: Callable[[list[int]], None] | None = None,
                log: tuple[tuple[str, ...], str] | None = None) -> list[WorkerReport]:
    """Start ``workers`` processes on ``store_spec`` and wait for all of them (``log``: ``(kinds, directory)``
    to log each trial's steps as its own run, see :mod:`batchpilot.sweep.trial_log`).

    Ctrl-C reaches the workers too (one process group): each releases its trial and stops; this re-raises
    :class:`KeyboardInterrupt` once they have.
    """
    if workers < 1:
        raise BatchpilotError(f"--workers must be >= 1, got {workers}")
    heartbeat_s = heartbeat_s if heartbeat_s is not None else max(0.05, min(10.0, lease_s / 4))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(i, workers, config, store_spec, lease_s, heartbeat_s, poll_s, results, log),
                         name=f"batchpilot-sweep-worker-{i + 1}") for i in range(workers)]
    for p in procs:
        p.start()
    if on_started is not None:
        on_started([p.pid for p in procs])
    reports: dict[int, dict] = {}
    interrupted = False
    try:
        while any(p.is_alive() for p in procs) or not results.empty():
            try:
                r = results.get(timeout=0.5)
                reports[r["index"]] = r
            except queue_mod.Empty:
                pass
    except KeyboardInterrupt:
        interrupted = True
        for p in procs:
            p.join(timeout=60)
    for p in procs:
        p.join(timeout=10)
    while True:
        try:
            r = results.get_nowait()
            reports[r["index"]] = r
        except (queue_mod.Empty, OSError, ValueError):
            break
    if interrupted or any(r.get("error") == "interrupted" for r in reports.values()):
        raise KeyboardInterrupt
    out = []
    for i, p in enumerate(procs):
        r = reports.get(i, {})
        error = r.get("error")
        if error is None and p.exitcode not in (0, None) and not r:
            error = f"the worker process ended with exit code {p.exitcode}" + (
                f" (signal {-p.exitcode})" if p.exitcode is not None and p.exitcode < 0 else "")
        out.append(WorkerReport(index=i, pid=p.pid, exitcode=p.exitcode, ran=r.get("ran", 0), skipped=r.get("skipped", 0),
                                failed=tuple(r.get("failed", ())), error=error))
    return out


def collect(config: SweepConfig, store: BaseTrialStore, *, ran: int, failed: tuple[dict, ...], wall_s: float,
            check_result: Callable[[dict, TrialSpec], str | None] = result_problem) -> tuple[SweepOutcome, list[TrialSpec]]:
    """Every trial of ``config`` as stored now: the outcome (done trials whose results pass ``check_result``)
    and the trials that are not done (none when the workers finished the grid)."""
    specs = config.trials()
    keys = [config.trial_key(t) for t in specs]
    rows = {r.key: r for r in store.rows(keys)}
    done, missing = [], []
    for key, trial in zip(keys, specs):
        row = rows.get(key)
        if row is not None and row.status == "done" and row.result is not None:
            problem = check_result(row.result, trial)
            if problem is None:
                done.append(row.result)
                continue
            store.invalid[key] = f"{problem}; the next run runs the trial again"
        missing.append(trial)
    failed_keys = {(f["batch"], f["lr_multiplier"], f["seed"], f["tag"]) for f in failed}
    unfinished = [t for t in missing if (t.batch, t.lr_multiplier, t.seed, t.tag) not in failed_keys]
    skipped = max(0, len(done) - ran)
    outcome = SweepOutcome(config=config, trials=tuple(done), ran=ran, skipped=skipped, failed=failed, wall_s=wall_s)
    return outcome, unfinished


__all__ = ["WorkerReport", "collect", "cpu_share", "run_workers"]
