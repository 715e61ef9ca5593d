"""Claims: "weight_decay ∝ √batch" and "dropout ∝ √batch" (seed 002, pattern 5 rule 2, pitfall 5 and
pattern 8 interactions 2-3; seeds/README.md #9 lists them as heuristics without evidence).

A minimal test of the scaling, not of regularization in general: mnist1d-mlp (SGD momentum 0.9, the
linear LR rule from 0.05 at batch 32) at batches 32 and 512 (16x, so √16 = 4x the regularization),
the same 20 epochs for both (the setting of the seed's "larger batch → worse generalization").

``--part wd``: weight decay 0, 1.25e-4, 5e-4 (the workload's), 2e-3, 8e-3.
``--part dropout``: the workload's MLP with dropout p after each hidden ReLU, p = 0, 0.1, 0.2, 0.4.

Reports the final validation accuracy (mean of two seeds) and the best value at each batch. The seed's
rule predicts that the best value at 512 is 4x the best at 32.

    python bench/claims/regularization.py --part wd        # about 1-2 minutes of CPU each
    python bench/claims/regularization.py --part dropout
    python bench/claims/regularization.py --part wd --batches 8   # seed 000: less weight decay at small batch?
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch
from torch import nn

import _curves
from batchpilot import get_workload
from batchpilot.workloads.mnist1d import MLP


class DropoutMLP(nn.Module):
    """mnist1d-mlp's MLP (same layers, same init order) with dropout after each hidden ReLU."""

    def __init__(self, p: float) -> None:
        super().__init__()
        base = MLP()
        lin = [m for m in base.net if isinstance(m, nn.Linear)]
        self.net = nn.Sequential(lin[0], nn.ReLU(), nn.Dropout(p), lin[1], nn.ReLU(), nn.Dropout(p), lin[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main() -> None:
    ap = argparse.ArgumentParser(description="weight decay / dropout ∝ √batch")
    ap.add_argument("--part", choices=("wd", "dropout"), required=True)
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--batches", default="32,512", help="batches to compare (the √batch check needs 32 and 512)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(1)
    w0 = get_workload("mnist1d-mlp")
    budget = int(args.epochs * w0.num_train)
    values = (0.0, 1.25e-4, 5e-4, 2e-3, 8e-3) if args.part == "wd" else (0.0, 0.1, 0.2, 0.4)
    label = "weight decay" if args.part == "wd" else "dropout p"
    print(f"mnist1d-mlp, SGD momentum 0.9, linear LR rule, {args.epochs:g} epochs, seeds 0-{args.seeds - 1}: "
          f"final val_acc, seed mean (in brackets: mean training loss of the last 50 steps) by {label}")
    print(f"| batch | LR | " + " | ".join(f"{v:g}" for v in values) + f" | best {label} |")
    print("|---:|---:|" + "---:|" * (len(values) + 1))
    best = {}
    for b in batches:
        lr = w0.base_lr * b / w0.base_batch
        cells, means = [], []
        for v in values:
            if args.part == "wd":
                w = w0
                opt = lambda params, lr, v=v: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=v)
            else:
                w = dataclasses.replace(w0, make_model=lambda v=v: DropoutMLP(v))
                opt = None
            accs, losses = [], []
            for seed in range(args.seeds):
                c = _curves.run_curve(w, batch=b, lr=lr, samples=budget, eval_at=[], seed=seed, make_optimizer=opt)
                accs.append(c.points[-1][3] if not c.diverged else float("nan"))
                losses.append(statistics.fmean(c.losses[-50:]) if not c.diverged else float("nan"))
            means.append(statistics.fmean(accs))
            cells.append(f"{means[-1]:.3f} ({statistics.fmean(losses):.2f})")
        best[b] = values[max(range(len(values)), key=lambda i: means[i])]
        print(f"| {b} | {lr:g} | " + " | ".join(cells) + f" | {best[b]:g} |", flush=True)
    if 32 in best and 512 in best:
        pred = best[32] * 4
        print(f"the rule predicts the best {label} at 512 = 4 x the best at 32 = {pred:g}; measured {best[512]:g}")


if __name__ == "__main__":
    main()
