"""Claim: noise as temperature, T ∝ η/B. Runs with the same η/B follow the same loss-vs-samples curve.

Seed 000 ("The Crucial Role of Batch Size" and "The Linear Scaling Rule"): "By keeping the ratio η/B
constant, you ensure that the optimizer's update per example remains roughly the same, leading to
nearly identical training curves when plotted against the number of examples seen."

mnist1d-mlp (SGD, momentum 0.9, weight decay 5e-4), η/B held at the workload's base point 0.05/32,
batches 16 … 2048, 16 epochs (64,000 samples), two seeds. The validation loss at each sample count
is compared with batch 16's (the reference, the smallest batch); the seed-to-seed spread of the
reference is the noise floor. Two controls break the ratio (batch 256 at batch 32's LR: 8x colder;
batch 32 at batch 256's LR: 8x hotter) to show that the collapse comes from η/B, not from the
curves being insensitive.

    python bench/claims/temperature.py            # about 1 minute of CPU on one thread
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

import _curves
from batchpilot import get_workload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="16,32,64,128,256,512,1024,2048")
    ap.add_argument("--epochs", type=float, default=16)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    w = get_workload("mnist1d-mlp")
    ratio = w.base_lr / w.base_batch
    budget = int(args.epochs * w.num_train)
    checks = [2000, 4000, 8000, 16000, 32000, 64000]
    checks = [c for c in checks if c <= budget]
    batches = [int(b) for b in args.batches.split(",")]
    seeds = range(args.seeds)

    evals = _curves.geometric(1000, budget, per_octave=4)

    def run(b, lr, seed):
        return _curves.run_curve(w, batch=b, lr=lr, samples=budget, eval_at=evals, seed=seed)

    runs = {(b, ratio * b): [run(b, ratio * b, s) for s in seeds] for b in batches}
    controls = {(256, ratio * 32): [run(256, ratio * 32, s) for s in seeds],
                (32, ratio * 256): [run(32, ratio * 256, s) for s in seeds]}

    def at(cs, s, col):  # seed mean of column col (1 train loss, 2 val loss) at the first eval >= s
        vals = [next((p[col] for p in c.points if p[0] >= s), math.inf) for c in cs]  # inf after a divergence
        return statistics.fmean(vals) if all(math.isfinite(v) for v in vals) else math.inf

    ref = runs[(batches[0], ratio * batches[0])]
    late = [s for s in evals if s >= 8000]

    def max_dev(cs, col):
        d = [abs(at(cs, s, col) / at(ref, s, col) - 1) for s in late]
        return max(d) if all(math.isfinite(x) for x in d) else math.inf

    floor = {col: max(abs(at(ref[:1], s, col) - at(ref[-1:], s, col)) / at(ref, s, col) for s in late) for col in (1, 2)}
    print(f"mnist1d-mlp, SGD momentum 0.9, η/B = {ratio:.6g} (LR = {ratio:.6g} x B), {args.epochs:g} epochs, "
          f"{args.seeds} seeds; training loss (mean since the previous evaluation, seed mean) at samples seen")
    print("| batch | LR | " + " | ".join(f"{s:,}" for s in checks)
          + " | max dev. of train loss from B16, ≥ 8k samples | of val loss | samples to val_acc ≥ 0.6 (per seed) |")
    print("|" + "---:|" * (len(checks) + 5))
    for (b, lr), cs in {**runs, **controls}.items():
        cells = " | ".join("div" if not math.isfinite(v) else f"{v:.3f}" for v in (at(cs, s, 1) for s in checks))
        to = [c.samples_to("val_metric", ">=", 0.6) for c in cs]
        tag = "" if (b, lr) in runs else (" (control: 8x colder)" if b == 256 else " (control: 8x hotter)")
        fmt = lambda d: "inf" if not math.isfinite(d) else f"{d:.1%}"
        print(f"| {b}{tag} | {lr:.4g} | {cells} | {fmt(max_dev(cs, 1))} | {fmt(max_dev(cs, 2))} | "
              f"{' / '.join('never' if t is None else f'{t:,}' for t in to)} |")
    print(f"noise floor at batch {batches[0]} (max over ≥ 8k samples of |seed 0 - seed {args.seeds - 1}| / mean): "
          f"train loss {floor[1]:.1%}, val loss {floor[2]:.1%}")
    print("diverged: " + (", ".join(f"B{b} seed {i} after {c.samples:,} samples ({c.steps} steps)"
                                    for (b, _), cs in {**runs, **controls}.items() for i, c in enumerate(cs) if c.diverged) or "none"))
    print("validation loss (seed mean) at the same points: " + "; ".join(
        f"B{b}: " + ", ".join("div" if not math.isfinite(v) else f"{v:.3f}" for v in (at(cs, s, 2) for s in checks))
        for (b, _), cs in runs.items()))


if __name__ == "__main__":
    main()
