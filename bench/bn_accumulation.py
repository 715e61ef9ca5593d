"""BatchNorm under gradient accumulation is not one large batch: measure by how much.

Trains ``digits-cnn-bn`` at one global batch with different micro-batches (so only
the BN statistics differ) and, as the control, ``mnist1d-mlp`` (no BN) the same way.
Prints the final validation accuracy and the relative weight difference from the
no-accumulation run. Run: ``python bench/bn_accumulation.py``.
"""

from __future__ import annotations

import argparse

import torch

from batchpilot import get_workload
from batchpilot.train import TrainConfig, Trainer


@torch.no_grad()
def weight_rel_diff(a, b) -> float:
    num = sum(float((p - q).pow(2).sum()) for p, q in zip(a.parameters(), b.parameters()))
    den = sum(float(q.pow(2).sum()) for q in b.parameters())
    return (num / den) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    print(f"global batch {args.batch}, {args.epochs} epochs, float64, mean over {args.seeds} seeds")
    print(f"{'workload':<15}{'micro':>7}{'accum':>7}{'val_acc':>10}{'|dW|/|W| vs no accum':>24}")
    for name in ("digits-cnn-bn", "mnist1d-mlp"):
        w = get_workload(name)
        for micro in (args.batch, 64, 16, 4):
            accs, diffs = [], []
            for seed in range(args.seeds):
                ref = Trainer(w, TrainConfig(global_batch=args.batch, epochs=args.epochs, seed=seed, dtype="float64"))
                ref.run()
                t = Trainer(w, TrainConfig(global_batch=args.batch, micro_batch_per_rank=micro, epochs=args.epochs,
                                           seed=seed, dtype="float64"))
                accs.append(t.run().val_metric)
                diffs.append(weight_rel_diff(t.model, ref.model))
            print(f"{name:<15}{micro:>7}{args.batch // micro:>7}{sum(accs) / len(accs):>10.4f}"
                  f"{sum(diffs) / len(diffs):>24.3e}")


if __name__ == "__main__":
    main()
