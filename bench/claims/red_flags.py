"""Rules of thumb about hardware use against the batch that is fastest to the target.

Checked here:
* "Throughput plateau → optimal batch reached": the batch where samples/s stops growing is the best
  one. (Issue 19 lists it among the seeds' red-flag rules; seed 002 does not say it in these words.
  Its nearest statement is the red-flag row "'Larger batch = faster training' — Depends on what you
  measure (iterations vs epochs vs wall-clock) — Measure actual wall-clock time at different batch
  sizes", which this check agrees with.)
* "GPU utilization < 80% → batch too small" (also not in seed 002 in these words). Its CPU analogue,
  MFU (model FLOPs / step time / measured peak FLOP/s), is printed per batch.
* Seed 002's "Start with batch size that uses ~80% GPU memory" / Pitfall 1's fix "Use 80% of maximum
  batch size": the training set (4000) bounds the batch here, so 80% of the maximum is 3200.

Throughput and MFU come from batchpilot's own measurement (``batchpilot.throughput.measure_throughput``,
one CPU thread, interleaved rounds). Steps to the workload's target at each batch use the workload's LR
rule (linear for SGD, square root for AdamW) with a 0.5-epoch linear warmup above the base batch (as in
claims.md #8), at most 30 epochs, evaluated every 320 samples (every step from batch 320).
Time to target = steps × measured seconds per step (evaluation not counted).

    python bench/claims/red_flags.py      # about 2 minutes of CPU on one thread
"""

from __future__ import annotations

import argparse

import torch

import _curves
from batchpilot import get_workload
from batchpilot.scaling.lr_rules import default_lr_rule, scale_lr
from batchpilot.throughput.measure import measure_throughput

BATCHES = (16, 32, 64, 128, 256, 512, 1024, 2048, 3200, 4000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="mnist1d-mlp,mnist1d-cnn")
    ap.add_argument("--epochs", type=float, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.workloads.split(","):
        w = get_workload(name)
        tc = measure_throughput(w, batch_sizes=BATCHES, time_budget_s=30, rounds=4)
        pts = {p.batch: p for p in tc.points}
        rule = default_lr_rule(w.optimizer_family())
        tgt = w.target
        stop = ("val_metric" if tgt.metric != "val_loss" else "val_loss", tgt.op, tgt.value)
        budget = int(args.epochs * w.num_train)
        rows = []
        for b in BATCHES:
            lr = scale_lr(w.base_lr, w.base_batch, b, rule)
            warm = 0 if b <= w.base_batch else w.num_train // 2
            sched = (lambda s, lr=lr, warm=warm: lr * min(1.0, (s + 1) / warm)) if warm else lr
            c = _curves.run_curve(w, batch=b, lr=sched, samples=budget, eval_at=range(max(b, 320), budget + 1, max(b, 320)),
                                  stop_at=stop)
            steps = c.steps_to(*stop)
            p = pts.get(b)
            t = steps * p.step_s if (steps is not None and p is not None) else None
            rows.append((b, lr, p, steps, t, c.diverged))
        best_sps = max(p.samples_per_s for p in tc.points)
        plateau = next(p.batch for p in tc.points if p.samples_per_s >= 0.9 * best_sps)
        reached = [r for r in rows if r[4] is not None]
        fastest = min(reached, key=lambda r: r[4]) if reached else None
        print(f"\n{name} ({rule} LR rule from {w.base_lr:g} at {w.base_batch}; target {tgt.metric}{tgt.op}{tgt.value}); "
              f"peak {tc.peak_flops / 1e9:.1f} GFLOP/s ({tc.peak_source}), fitted saturation batch {tc.saturation_batch:.0f}")
        print("| batch | LR | samples/s | MFU | steps to target | time to target (s) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for b, lr, p, steps, t, div in rows:
            sps = f"{p.samples_per_s:,.0f}" if p else "n/a"
            mfu = f"{p.mfu:.1%}" if p else "n/a"
            st = "div" if div else ("never" if steps is None else str(steps))
            print(f"| {b} | {lr:.4g} | {sps} | {mfu} | {st} | {'—' if t is None else f'{t:.2f}'} |", flush=True)
        print(f"throughput plateau (first batch with >= 90% of the best samples/s, {best_sps:,.0f}): {plateau}; "
              f"fastest to target: {fastest[0] if fastest else 'none'}"
              + (f" ({fastest[4]:.2f} s); at the plateau batch: "
                 + next((f"{r[4]:.2f} s" if r[4] is not None else ('diverged' if r[5] else 'never')) for r in rows if r[0] == plateau)
                 if fastest else ""))


if __name__ == "__main__":
    main()
