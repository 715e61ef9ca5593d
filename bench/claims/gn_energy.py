"""Claim (seed 000, "The Freedom of Independence"): BatchNorm's "reliance on large batches for stable statistics"
can force several devices just "to gather a large enough batch", with their energy cost; GroupNorm "can be
trained effectively with a small batch on a single GPU, potentially saving a significant amount of energy".

digits-cnn-bn (SGD, momentum 0.9, LR 0.05·B/32) as built (BatchNorm) and with its BatchNorm layers converted to
GroupNorm (``batchpilot.norm.convert_batchnorm(..., "group", groups=4)``: 4 groups of 4 and of 8 channels).
For each batch: optimizer steps to the workload's target (val_acc >= 0.95, at most ``--epochs`` epochs, evaluated
every quarter epoch, seeds 0 and 1), seconds per step (a training step at that batch, one thread, medians of
interleaved rounds so every configuration sees the same background load, in CPU time of the process so that time
spent waiting for a core on a shared machine is not counted; the spread is the range over the rounds; the median
wall time is printed too), device-seconds = steps × CPU s/step, and energy = device-seconds × 3.5 W, Cloud Carbon Footprint's
average maximum power of one cloud vCPU (its methodology, Appendix I, AWS: "Average Maximum Watts (100% CPU
Utilization): 3.5"); each run uses one thread, one vCPU.

    python bench/claims/gn_energy.py      # about 3-5 minutes of CPU on one thread
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import _curves
from batchpilot import get_workload
from batchpilot.norm import convert_batchnorm
from batchpilot.workloads.data import fetch

WATTS_PER_VCPU = 3.5  # Cloud Carbon Footprint methodology, Appendix I (AWS, 100% CPU utilization)


def workloads():
    bn = get_workload("digits-cnn-bn")
    make_bn = bn.make_model
    gn = dataclasses.replace(bn, name="digits-cnn-gn", make_model=lambda: convert_batchnorm(make_bn(), "group", groups=4))
    return {"BatchNorm": bn, "GroupNorm": gn}


def step_seconds(ws: dict, batches, rounds: int, steps: int) -> dict:
    """Per (norm, batch): the median CPU seconds of a training step over interleaved rounds of ``steps`` steps,
    their range, and the median wall seconds (which, on a shared machine, include time spent waiting for a core)."""
    setups = {}
    for name, w in ws.items():
        for b in batches:
            torch.manual_seed(0)
            model = w.make_model()
            opt = w.make_optimizer(model.parameters(), 0.05 * b / 32)
            setups[name, b] = (model, opt, w, torch.arange(b) % w.num_train)
    per_round = {k: [] for k in setups}
    for _ in range(rounds):
        for key, (model, opt, w, idx) in setups.items():
            x, y = fetch(w.train_data, idx)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                w.loss_sum(model(x), y).div(len(idx)).backward()
                opt.step()
            per_round[key].append(((time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps))
    out = {}
    for k, v in per_round.items():
        wall, cpu = [a for a, _ in v], [b for _, b in v]
        out[k] = (statistics.median(cpu), min(cpu), max(cpu), statistics.median(wall))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="4,8,16,32,64,128")
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    ws = workloads()
    n = ws["BatchNorm"].num_train
    target = ("val_metric", ">=", 0.95)
    steps = {}
    for name, w in ws.items():
        for b in batches:
            got = []
            for seed in range(args.seeds):
                c = _curves.run_curve(w, batch=b, lr=0.05 * b / 32, samples=int(args.epochs * n),
                                      eval_at=range(n // 4, int(args.epochs * n) + 1, n // 4), seed=seed, stop_at=target)
                got.append(None if c.diverged else c.steps_to(*target))
            steps[name, b] = got
    timing = step_seconds(ws, batches, args.rounds, steps=20)
    print(f"digits-cnn-bn, LR 0.05·B/32, steps to val_acc >= 0.95 (seeds 0-{args.seeds - 1}, at most {args.epochs:g} "
          f"epochs); CPU s/step: median of {args.rounds} interleaved rounds [range]; energy at {WATTS_PER_VCPU} W per vCPU")
    print("| norm | batch | steps (per seed) | CPU ms/step [range] | wall ms/step | device-seconds to target (seed mean) "
          "| energy (J) |")
    print("|---|---:|---|---|---:|---:|---:|")
    for name in ws:
        for b in batches:
            got = steps[name, b]
            med, lo, hi, wall = timing[name, b]
            shown = " / ".join(str(s) if s else "never" for s in got)
            if all(got):
                dev = statistics.mean(got) * med
                print(f"| {name} | {b} | {shown} | {med * 1e3:.2f} [{lo * 1e3:.2f}–{hi * 1e3:.2f}] | {wall * 1e3:.2f} | {dev:.2f} | "
                      f"{dev * WATTS_PER_VCPU:.1f} |")
            else:
                print(f"| {name} | {b} | {shown} | {med * 1e3:.2f} [{lo * 1e3:.2f}–{hi * 1e3:.2f}] | {wall * 1e3:.2f} | — | — |")


if __name__ == "__main__":
    main()
