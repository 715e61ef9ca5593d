"""Claim: "Momentum: accumulates larger steps, works best with smaller batch".

Seed 002, pattern 8 ("Interaction 5: Batch size ↔ Optimizer choice"). Shallue et al. 2019 (JMLR,
"Measuring the Effects of Data Parallelism on Neural Network Training") and Zhang et al. 2019
("Which Algorithmic Choices Matter at Which Batch Sizes?", the noisy quadratic model) find the
opposite: at small batch, momentum SGD is no faster than plain SGD with its effective LR
η/(1-β); at large batch, momentum reaches the target in fewer steps (it extends perfect scaling).

mnist1d-mlp (its weight decay 5e-4), SGD with momentum 0.9 against plain SGD, at batches 32, 256 and
1024. Both get the same grid of *effective* LRs η_eff = η/(1-β) (plain SGD: η = η_eff; momentum 0.9:
η = η_eff / 10), ×1/8 … ×2 of the linear rule's η_eff(B) = 0.5 · B/32 (the workload's 0.05 at batch 32,
with momentum), and each keeps its best LR. Steps to val_acc ≥ 0.6 (the workload's target), at most
20 epochs, evaluated every 320 samples (every 10 steps at batch 32, every step from 256), two seeds.

    python bench/claims/momentum.py        # about 2 minutes of CPU on one thread
"""

from __future__ import annotations

import argparse

import torch

import _curves
from batchpilot import get_workload


def sgd(momentum: float):
    return lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=5e-4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="32,256,1024")
    ap.add_argument("--multipliers", default="0.125,0.25,0.5,1,2")
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    w = get_workload("mnist1d-mlp")
    mults = [float(m) for m in args.multipliers.split(",")]
    budget = int(args.epochs * w.num_train)
    target = ("val_metric", ">=", 0.6)
    print(f"mnist1d-mlp, steps to val_acc >= 0.6 (at most {args.epochs:g} epochs), seeds 0-{args.seeds - 1} "
          "(cells: seed 0 / seed 1 ...); columns: effective LR x" + ", x".join(f"{m:g}" for m in mults)
          + " of η_eff(B) = 0.5·B/32; best: the LR with the fewest mean steps")
    print("| batch | optimizer | " + " | ".join(f"×{m:g}" for m in mults) + " | best: steps (η_eff) |")
    print("|---:|---|" + "---:|" * (len(mults) + 1))
    best = {}
    for b in (int(x) for x in args.batches.split(",")):
        evals = range(max(b, 320), budget + 1, max(b, 320))
        for beta in (0.9, 0.0):
            cells, found = [], []
            for m in mults:
                eff = 0.5 * b / 32 * m
                per_seed = []
                for seed in range(args.seeds):
                    c = _curves.run_curve(w, batch=b, lr=eff * (1 - beta), samples=budget, eval_at=evals, seed=seed,
                                          make_optimizer=sgd(beta), stop_at=target)
                    s = c.steps_to(*target)
                    per_seed.append("div" if c.diverged else ("—" if s is None else s))
                cells.append(" / ".join(str(x) for x in per_seed))
                if all(isinstance(x, int) for x in per_seed):
                    found.append((sum(per_seed) / len(per_seed), eff))
            best[(b, beta)] = min(found) if found else None
            bs = "never" if not found else f"{min(found)[0]:.0f} ({min(found)[1]:g})"
            print(f"| {b} | {'momentum 0.9' if beta else 'plain SGD'} | " + " | ".join(cells) + f" | {bs} |", flush=True)
    print("ratio of best steps, plain / momentum: " + ", ".join(
        f"B{b}: " + ("n/a" if best[(b, 0.9)] is None or best[(b, 0.0)] is None else f"{best[(b, 0.0)][0] / best[(b, 0.9)][0]:.2f}")
        for b in (int(x) for x in args.batches.split(","))))


if __name__ == "__main__":
    main()
