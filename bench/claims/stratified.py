"""Claims (seed 000, "The Art of the Batch"): a rare class's gradient is drowned in a random batch; up-weighting
its loss instead "generate[s] a gradient of enormous magnitude, causing a violent, high-variance lurch"; stratified
batches with "a fixed, representative number of examples from the rare class" reduce the variance and enable
"stable and effective learning even under severe class imbalance".

mnist1d-mlp with class 0 cut to ``--rare`` training samples (20 of 3,622: 0.55%); the validation set stays
balanced (102 samples of class 0). Batch 32, the workload's SGD (momentum 0.9, LR 0.05, weight decay 5e-4),
``--epochs`` epochs of ``N // 32`` steps, seeds 0 and 1. Four ways to batch:

* ``uniform``: random batches, mean loss (the plain objective);
* ``uniform, weighted``: random batches, class-balanced loss weights N / (C · N_c) (class 0: ×18);
* ``stratified, unbiased``: :class:`~batchpilot.train.samplers.StratifiedBatchSampler` with at least 3 of
  each class per batch, with its unbiased weights (the plain objective, less variance);
* ``stratified, oversampled``: the same batches without the weights (class 0 is 3/32 of every batch: in
  expectation the weighted objective, ×17 for class 0, but a fixed count of it in every batch).

Printed per arm: recall of class 0 and accuracy on the validation set (seed mean), and the gradient noise of
its estimator at one point (the model after 2 epochs of uniform training): the mean ‖g_batch − g_full‖² over 300
batches, over ‖g_full‖² of the arm's own objective; and during training, the 99th percentile of the per-step
gradient norm over its median (the "lurch").

    python bench/claims/stratified.py      # about 1-2 minutes of CPU on one thread
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from batchpilot import get_workload
from batchpilot.train.samplers import StratifiedBatchSampler
from batchpilot.workloads.data import EpochBatchSampler

ARMS = ("uniform", "uniform, weighted", "stratified, unbiased", "stratified, oversampled")


def imbalanced(w, rare: int):
    x, y = w.train_data.tensors
    keep = torch.cat([torch.nonzero(y == 0).flatten()[:rare], torch.nonzero(y != 0).flatten()])
    keep = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(0))]
    return x[keep], y[keep]


class Batches:
    """Indices and per-sample loss weights of one arm's next batch."""

    def __init__(self, arm: str, y: torch.Tensor, batch: int, seed: int) -> None:
        self.arm, self.y, self.batch = arm, y, batch
        counts = torch.bincount(y).double()
        self.class_w = (len(y) / (len(counts) * counts)).float()
        self.uniform = EpochBatchSampler(len(y), seed=seed)
        self.strat = StratifiedBatchSampler(y, batch, min_per_class=3, seed=seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.arm.startswith("uniform"):
            idx = self.uniform.next_batch(self.batch)
            w = self.class_w[self.y[idx]] if self.arm.endswith("weighted") else torch.ones(len(idx))
        else:
            idx = self.strat.next_batch()
            w = self.strat.weights(self.y[idx]) if self.arm.endswith("unbiased") else torch.ones(len(idx))
        return idx, w

    def objective_weights(self) -> torch.Tensor:
        """Per-sample weights of the arm's expected objective over the whole training set."""
        if self.arm in ("uniform", "stratified, unbiased"):
            return torch.ones(len(self.y))
        if self.arm == "uniform, weighted":
            return self.class_w[self.y]
        q = torch.tensor(self.strat.quotas, dtype=torch.float32)  # oversampled: class c weighs (q_c/B)/(N_c/N)
        counts = torch.bincount(self.y).float()
        return ((q / self.batch) / (counts / len(self.y)))[self.y]


def loss_of(model, x, y, w) -> torch.Tensor:
    return (w * F.cross_entropy(model(x), y, reduction="none")).mean()


def flat_grad(model, x, y, w) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss_of(model, x, y, w).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def train(w, x, y, arm: str, epochs: float, seed: int, batch: int = 32):
    torch.manual_seed(seed)
    model = w.make_model()
    opt = w.make_optimizer(model.parameters(), w.base_lr)
    src = Batches(arm, y, batch, seed)
    norms = []
    for _ in range(int(epochs * (len(y) // batch))):
        idx, wt = src.next()
        opt.zero_grad(set_to_none=True)
        loss_of(model, x[idx], y[idx], wt).backward()
        norms.append(float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))))
        opt.step()
    return model, norms


def evaluate(model, w) -> tuple[float, float]:
    xv, yv = w.val_data.tensors
    with torch.no_grad():
        pred = model(xv).argmax(1)
    return float((pred[yv == 0] == 0).float().mean()), float((pred == yv).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rare", type=int, default=20, help="training samples of class 0 kept")
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    w = get_workload("mnist1d-mlp")
    x, y = imbalanced(w, args.rare)
    print(f"mnist1d-mlp, class 0 cut to {args.rare} of {len(y)} training samples; batch 32, {args.epochs:g} epochs, "
          f"seeds 0-{args.seeds - 1}")
    probe, _ = train(w, x, y, "uniform", 2, seed=0)
    print("| batching | class-0 recall (per seed) | val acc | batches with no class 0 | noise ‖g−G‖²/‖G‖² at the probe "
          "| step-norm p99/median |")
    print("|---|---|---:|---:|---:|---:|")
    for arm in ARMS:
        src = Batches(arm, y, 32, seed=5)
        full = flat_grad(probe, x, y, src.objective_weights())
        errs, empty = [], 0
        for _ in range(300):
            idx, wt = src.next()
            empty += int((y[idx] == 0).sum() == 0)
            errs.append(float(((flat_grad(probe, x[idx], y[idx], wt) - full) ** 2).sum()))
        noise = statistics.mean(errs) / float((full ** 2).sum())
        recalls, accs, lurch = [], [], []
        for seed in range(args.seeds):
            model, norms = train(w, x, y, arm, args.epochs, seed)
            r, a = evaluate(model, w)
            recalls.append(r)
            accs.append(a)
            q = sorted(norms)
            lurch.append(q[int(0.99 * (len(q) - 1))] / statistics.median(q))
        print(f"| {arm} | {statistics.mean(recalls):.3f} ({', '.join(f'{r:.3f}' for r in recalls)}) | "
              f"{statistics.mean(accs):.3f} | {empty / 300:.0%} | {noise:.1f} | {statistics.mean(lurch):.2f} |")


if __name__ == "__main__":
    main()
