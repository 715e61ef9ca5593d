"""Time to target: the noise-adaptive batch controller against the best fixed batch of a sweep.

In one run, on one workload (default ``mnist1d-cnn``, target ``val_acc>=0.85``):

1. a sweep of fixed global batches, each with its LR scaled from the workload's base point by the
   optimizer's rule (square root for AdamW), trained until the target (or ``--max-epochs``);
2. the adaptive controller (``TrainConfig(adaptive=True)``) started at the base batch, with the
   same LR rule, the live gradient-noise monitor and its one-off throughput probe — all of which
   count as training time.

Every configuration runs ``--seeds`` times; the median time to target is compared. Evaluation runs
after every step and is *not* counted (``time_to_target_s`` is training time only), so every
configuration is timed at the same granularity. Prints a table and the ratio
``adaptive / best fixed`` (goal <= 0.9). Wall-clock on a shared machine is noisy: read the
per-seed numbers, not only the ratio.

Run: ``python bench/adaptive_vs_fixed.py [--workload mnist1d-cnn] [--seeds 3] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

from batchpilot import get_workload
from batchpilot.train import TrainConfig, Trainer


def run_one(workload, seed: int, max_epochs: float, **kw) -> dict:
    trainer = Trainer(workload, TrainConfig(epochs=max_epochs, eval_every=1, stop_at_target=True, seed=seed, **kw))
    r = trainer.run()
    return {"time_s": r.time_to_target_s if r.time_to_target_s is not None else math.inf,
            "steps": r.steps_to_target, "samples": r.samples_to_target, "val": r.val_metric,
            "batches": [list(x) for x in r.batch_sizes],
            "decisions": getattr(trainer.batching, "decisions", None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="mnist1d-cnn")
    ap.add_argument("--batches", default="32,64,128,256,512", help="the fixed-batch sweep")
    ap.add_argument("--max-batch", type=int, default=512, help="the adaptive controller's limit")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-epochs", type=float, default=40)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier timing on a shared box)")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w = get_workload(args.workload)
    print(f"{w.name}: target {w.target}, base batch {w.base_batch}, base lr {w.base_lr:g}, "
          f"{args.seeds} seeds, {args.threads} thread(s); time = training time to target (evaluation excluded)")
    results: dict[str, list[dict]] = {}
    for seed in range(args.seeds):  # interleave configurations so machine load drifts hit them alike
        for b in (int(x) for x in args.batches.split(",")):
            results.setdefault(f"fixed {b}", []).append(run_one(w, seed, args.max_epochs, global_batch=b))
        results.setdefault("adaptive", []).append(
            run_one(w, seed, args.max_epochs, global_batch=w.base_batch, adaptive=True, max_batch=args.max_batch))
    print(f"{'config':<14}{'median s':>10}{'per-seed time to target (s)':>40}{'median steps':>14}{'median samples':>16}")
    medians = {}
    for name, runs in results.items():
        times = [r["time_s"] for r in runs]
        medians[name] = statistics.median(times)
        steps = statistics.median([r["steps"] if r["steps"] is not None else math.inf for r in runs])
        samples = statistics.median([r["samples"] if r["samples"] is not None else math.inf for r in runs])
        print(f"{name:<14}{medians[name]:>10.2f}{', '.join(f'{t:.2f}' for t in times):>40}{steps:>14}{samples:>16}")
    for i, r in enumerate(results["adaptive"]):
        noise = ", ".join(f"{d['b_noise']:.0f}" for d in (r["decisions"] or [])[:8])
        print(f"adaptive seed {i}: batches (step, batch) {r['batches']}; noise scale at the first decisions: {noise}")
    fixed = {k: v for k, v in medians.items() if k.startswith("fixed")}
    best = min(fixed, key=fixed.get)
    ratio = medians["adaptive"] / fixed[best]
    print(f"best fixed: {best} ({fixed[best]:.2f} s); adaptive {medians['adaptive']:.2f} s; "
          f"ratio adaptive / best fixed = {ratio:.3f} (goal <= 0.9)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "medians": medians, "best_fixed": best, "ratio": ratio}, fh, indent=1,
                      default=str)


if __name__ == "__main__":
    main()
