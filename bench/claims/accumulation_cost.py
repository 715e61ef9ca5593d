"""Claim: "gradient accumulation costs ~1.5-2x wall-clock" (and "8x longer (8 backward passes instead of 1)").

Seed 002, pattern 3 ("Cost: 8x longer (8 backward passes instead of 1) / Net wall-clock: ~1.5-2x
slower (overhead, synchronization)", and the comparison table "Wall-clock time: Fast / ~1.5-2x
slower"); the rationalization table repeats "it's slower (1.5-2x)".

Measures seconds per optimizer step of one global batch taken as k micro-batches of m (k = 1 … 32),
timed round-robin (``bench/_shared.py``'s ``interleaved_step_times``) so that the shared machine's load
hits every configuration alike, on one CPU thread. Also times one step of the micro-batch alone
(m, no accumulation), which gives the prediction

    slowdown(k x m) ≈ k · t(1 x m) / t(1 x k·m)   (per-sample cost at m over per-sample cost at k·m)

(an over-estimate: each 1 x m step also pays a whole optimizer step, an accumulated step pays one for
all k). Accumulation costs what the throughput curve T(B) loses between the micro-batch and the batch:
nothing where the device is saturated at m, a lot where m leaves it idle. On this CPU the per-sample
cost is nearly flat in B; on a GPU small micro-batches leave the device idle (not measured here: no
GPU in this session).

    python bench/claims/accumulation_cost.py        # about 1-2 minutes on one thread
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for _shared
from _shared import interleaved_step_times  # noqa: E402

from batchpilot import get_workload  # noqa: E402

CASES = {  # workload: (global batch, micro-batches)
    "mnist1d-mlp": (256, (256, 128, 64, 32, 16, 8)),
    "mnist1d-cnn": (256, (256, 128, 64, 32, 16, 8)),
    "charlm": (64, (64, 32, 16, 8, 4, 2)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default=",".join(CASES))
    ap.add_argument("--budget", type=float, default=15.0, help="seconds of timed rounds per workload (at least 10 rounds)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| workload | global batch B | micro-batch m | accumulation k | s / step (median) | slowdown vs 1 x B | "
          "k · t(1 x m) / t(1 x B) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.workloads.split(","):
        w = get_workload(name)
        B, micros = CASES[name]
        configs = [(B, m) for m in micros] + [(m, m) for m in micros if m != B]
        times = interleaved_step_times(w, configs, rounds=10, warmup=2, time_budget_s=args.budget)
        med = {c: statistics.median(t) for c, t in times.items()}
        base = med[(B, B)]
        for m in micros:
            k = B // m
            single = med[(m, m)] if m != B else base
            print(f"| {name} | {B} | {m} | {k} | {med[(B, m)]:.4f} | {med[(B, m)] / base:.2f}x | "
                  f"{k * single / base:.2f}x |", flush=True)
        print(f"| {name} | rounds timed: {min(len(t) for t in times.values())}-{max(len(t) for t in times.values())} | | | | | |")


if __name__ == "__main__":
    main()
