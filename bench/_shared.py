"""Pieces shared by the planner benchmarks (``plan_vs_sweep.py``, ``plan_accuracy.py``, ``plan_walltime.py``).

* :func:`interleaved_step_times`: seconds per optimizer step of several ``(batch, micro_batch)``
  configurations, timed round-robin so that a change in the machine's load hits all of them alike.
* :func:`run_plan_cli`: ``batchpilot plan`` in a fresh process, exactly as a user runs it, with its wall time.

The bench scripts run as ``python bench/<name>.py``, so ``bench/`` is on ``sys.path`` and they import
this module as ``_shared``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

Config = tuple[int, int]
"""``(global_batch, micro_batch)``: accumulation steps = global_batch / micro_batch."""


def interleaved_step_times(workload, configs: Sequence[Config], *, rounds: int = 30, warmup: int = 3,
                           seed: int = 0, time_budget_s: float | None = None,
                           max_rounds: int = 1000) -> dict[Config, list[float]]:
    """Seconds of each optimizer step of every configuration, ``rounds`` per configuration, timed round-robin.

    With ``time_budget_s``, ``rounds`` is a minimum: rounds go on until the timed rounds have taken that
    long (at most ``max_rounds``), so cheap steps get many rounds and costly ones few.

    Each configuration gets a fresh model and optimizer (under a forked RNG, so the caller's RNG is
    untouched). One step is what the trainer does per step apart from evaluation: fetch a random
    global batch, exact accumulation over its micro-batches, the optimizer step, zeroing the
    gradients. In round ``r`` every configuration takes one step, in the same order, so every
    configuration sees the same background load; the first ``warmup`` rounds are not kept. Runs
    with torch's current thread count (set it before calling).
    """
    from batchpilot.train import accumulate_gradients
    from batchpilot.workloads.data import fetch, split_micro

    configs = list(dict.fromkeys(configs))
    g = torch.Generator().manual_seed(seed)
    state = {}
    times: dict[Config, list[float]] = {c: [] for c in configs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch, micro in configs:
            model = workload.make_model()
            state[(batch, micro)] = (model, workload.make_optimizer(model.parameters(), 1e-6))
        r, t_timed = 0, None
        while True:
            if r == warmup:
                t_timed = time.perf_counter()
            kept = r - warmup
            if kept >= rounds and (time_budget_s is None or kept >= max_rounds
                                   or time.perf_counter() - t_timed >= time_budget_s):
                break
            for c in configs:
                model, opt = state[c]
                t0 = time.perf_counter()
                idx = torch.randint(0, workload.num_train, (c[0],), generator=g)
                micro = [fetch(workload.train_data, part) for part in split_micro(idx, c[1])]
                accumulate_gradients(model, micro, workload.loss_sum, workload.count_units)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if r >= warmup:
                    times[c].append(time.perf_counter() - t0)
            r += 1
    return times


def batchpilot_exe() -> str:
    """The ``batchpilot`` console script next to this interpreter (the venv's), else the one on PATH."""
    exe = Path(sys.executable).with_name("batchpilot")
    return str(exe) if exe.exists() else "batchpilot"


def run_plan_cli(args: Sequence[str], out_dir: str | Path, *, env: dict[str, str] | None = None,
                 timeout_s: float | None = None) -> tuple[dict, float, subprocess.CompletedProcess]:
    """Run ``batchpilot plan --json --out OUT_DIR *args`` in a fresh process and read its ``plan.json``.

    Returns ``(plan, wall_s, process)``: the wall time counts the whole process (imports, measurements,
    writing plan.json and, unless ``--no-report`` is among ``args``, report.html), which is what a user
    waits for. Raises ``RuntimeError`` with the tail of stderr when the command fails.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [batchpilot_exe(), "plan", "--json", "--out", str(out_dir), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout_s)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    plan = json.loads((out_dir / "plan.json").read_text())
    return plan, wall, proc
