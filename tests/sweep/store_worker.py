"""A sweep worker process for the store tests: the real runner and store, with a stand-in trial.

    python store_worker.py STORE LOG --batches 8,16,... [--trial-s S] [--hang-batch B] [--owner-host H]
                           [--stale-s S] [--heartbeat-s S] [--poll-s S]

Each trial appends ``start <batch> <pid> <time>`` to LOG, sleeps ``--trial-s`` (forever for ``--hang-batch``,
so the test can kill it while it holds the claim), appends ``end ...`` and returns a result. Lines are written
with one ``write`` on an ``O_APPEND`` file, so the lines of several workers never mix. Prints the outcome's
counts as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

from batchpilot.sweep.backends import open_store
from batchpilot.sweep.runner import SweepConfig, run_sweep
from batchpilot.sweep.store import make_owner


def log(path: str, *words: object) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (" ".join(str(w) for w in words) + "\n").encode())
    finally:
        os.close(fd)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("log")
    p.add_argument("--batches", required=True)
    p.add_argument("--trial-s", type=float, default=0.2)
    p.add_argument("--hang-batch", type=int, default=None)
    p.add_argument("--owner-host", default=None, help="pretend to run on another machine (only the lease can tell)")
    p.add_argument("--stale-s", type=float, default=120.0)
    p.add_argument("--heartbeat-s", type=float, default=0.2)
    p.add_argument("--poll-s", type=float, default=0.1)
    a = p.parse_args()
    owner = make_owner()
    if a.owner_host:
        owner = a.owner_host + owner[owner.index(":"):]
    config = SweepConfig(workload="stand-in", batches=tuple(int(b) for b in a.batches.split(",")), sharpness=False)

    def execute(workload, cfg, trial, on_step):
        log(a.log, "start", trial.batch, os.getpid(), time.time())
        if trial.batch == a.hang_batch:
            while True:
                time.sleep(1)
        time.sleep(a.trial_s)
        log(a.log, "end", trial.batch, os.getpid(), time.time())
        return {"batch": trial.batch, "lr_multiplier": trial.lr_multiplier, "seed": trial.seed, "status": "completed",
                "pid": os.getpid()}

    with open_store(a.store, owner=owner, stale_after_s=a.stale_s) as store:
        out = run_sweep(config, store, workload=lambda: SimpleNamespace(num_train=10**9), execute=execute, poll_s=a.poll_s,
                        heartbeat_s=a.heartbeat_s)
    print(json.dumps({"ran": out.ran, "skipped": out.skipped, "failed": len(out.failed),
                      "batches": sorted(t["batch"] for t in out.trials)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
