"""Claims on warmup (seed 000, "Taming the Beast"):

(a) "Some heuristics even propose that the length of the warmup period should increase as the batch
    size grows" — ``--part length``;
(b) "ramping up the learning rate is mathematically equivalent to starting with an enormous batch size
    and gradually decreasing it to the target size" — ``--part shrink``.

(a) mnist1d-cnn (AdamW, the workload where warmup mattered in claims.md #2). Separates the batch from
the LR: warmup lengths 0, 4, 12, 36, 108 steps in 160-step runs, (i) at one LR (0.09) for batches 64, 256
and 1024, (ii) at one batch (256) for LRs 0.045, 0.09 and 0.18. Reports the final validation accuracy
and the shortest warmup within 0.02 of the best.

(b) The same LR warmup against its "equivalent" batch schedule: constant peak LR η from the first
step, batch B_t = B · η / η_t (capped at the training set, 4000), so that η / B_t equals the warmup's
η_t / B at every sample count, shrinking to B at the end of the warmup. Both runs see the same samples.
Cases: mnist1d-mlp (SGD) at B 128, η 0.2 (the linear rule) and mnist1d-cnn (AdamW) at B 256, η 0.045
and η 0.09 (no warmup diverges there); warmup over 8000 samples (2 epochs), 20000 samples in all.

    python bench/claims/warmup.py --part length     # about 2-3 minutes on one thread
    python bench/claims/warmup.py --part shrink     # about 1 minute
"""

from __future__ import annotations

import argparse

import torch

import _curves
from batchpilot import get_workload

N_TRAIN = 4000


def warmup_lr(peak: float, steps: int, batch: int):
    """The trainer's linear warmup ``(step + 1) / steps`` (batchpilot.scaling.lr_schedules) as a function of samples."""
    return lambda s: peak * min(1.0, (s // batch + 1) / steps) if steps else peak


def part_length(seed: int) -> None:
    w = get_workload("mnist1d-cnn")
    steps, warmups = 160, (0, 4, 12, 36, 108)

    def row(batch, lr):
        res = []
        for wu in warmups:
            c = _curves.run_curve(w, batch=batch, lr=warmup_lr(lr, wu, batch), samples=steps * batch,
                                  eval_at=[], seed=seed)
            res.append(None if c.diverged else c.points[-1][3])
        ok = [a for a in res if a is not None]
        best = max(ok) if ok else None
        shortest = next((wu for wu, a in zip(warmups, res) if a is not None and a >= best - 0.02), None) if ok else None
        cells = " | ".join("div" if a is None else f"{a:.3f}" for a in res)
        sh = "—" if shortest is None else f"{shortest} steps = {shortest * batch:,} samples ({shortest * batch / N_TRAIN:.2g} ep)"
        print(f"| {batch} | {lr:g} | {cells} | {sh} |", flush=True)

    print(f"mnist1d-cnn (AdamW), {steps} steps, seed {seed}: final val_acc by warmup length (steps)")
    print("| batch | LR | " + " | ".join(f"warmup {wu}" for wu in warmups) + " | shortest warmup within 0.02 of the best |")
    print("|" + "---:|" * (len(warmups) + 3))
    for b in (64, 256, 1024):
        row(b, 0.09)
    for lr in (0.045, 0.18):
        row(256, lr)


def shrink_batch(batch: int, peak_warmup_samples: int):
    """B_t = B · η/η_t for the warmup ``η_t = η · min(1, (s + B) / W)`` over W samples, capped at the training set."""
    return lambda s: min(N_TRAIN, batch * peak_warmup_samples / (s + batch)) if s < peak_warmup_samples else batch


def part_shrink(seed: int) -> None:
    W, total = 8000, 20000
    evals = [1000, 2000, 4000, 8000, 12000, 16000]
    print(f"warmup over {W} samples vs a batch shrinking from {N_TRAIN} over the same samples at the peak LR; "
          f"{total} samples, seed {seed}. Cells: train loss (mean since the previous eval) / val metric")
    print("| workload | B, peak LR | schedule | steps | " + " | ".join(f"{s:,}" for s in evals + [total]) + " |")
    print("|---|---|---|---:|" + "---|" * (len(evals) + 1))
    for name, batch, lr in (("mnist1d-mlp", 128, 0.2), ("mnist1d-cnn", 256, 0.045), ("mnist1d-cnn", 256, 0.09)):
        w = get_workload(name)
        runs = {
            "constant (no warmup)": dict(batch=batch, lr=lr),
            "LR warmup": dict(batch=batch, lr=lambda s: lr * min(1.0, (s + batch) / W)),
            "batch shrink, constant LR": dict(batch=shrink_batch(batch, W), lr=lr),
        }
        for label, kw in runs.items():
            c = _curves.run_curve(w, samples=total, eval_at=evals, seed=seed, **kw)
            cells = []
            for s in evals + [total]:
                p = next((p for p in c.points if p[0] >= s), None)
                cells.append("div" if p is None else f"{p[1]:.3f} / {p[3]:.3f}")
            extra = f" (diverged at step {c.steps})" if c.diverged else ""
            print(f"| {name} | {batch}, {lr:g} | {label}{extra} | {c.steps} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="warmup claims of seed 000")
    ap.add_argument("--part", choices=("length", "shrink"), required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    (part_length if args.part == "length" else part_shrink)(args.seed)


if __name__ == "__main__":
    main()
