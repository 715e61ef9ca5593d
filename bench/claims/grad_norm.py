"""Claims: "If variance drops 2x, gradient magnitude is √2x smaller. To keep update magnitude constant:
lr should increase by 2x" (seed 002, pattern 2) and "Gradient magnitudes decrease with larger batch, so
learning rate must increase proportionally" (pitfall 2); seed 000: "its variance drops by a factor of k".

The mini-batch gradient is g_B = G + noise with E|g_B|² = |G|² + tr(Σ)/B: its *variance* falls as 1/B,
its squared norm falls towards |G|², not as 1/B. Measured on mnist1d-mlp at initialisation and after 2
epochs at batch 32 (LR 0.05): mean |g_B|² over 40 random batches (sampled without replacement within a
batch) at B = 16 … 2048, with the full-batch |G|² (all 4000 samples); the fitted tr(Σ) from the
smallest batch; and the ratio of norms between neighbouring batches (the seed's rule says 1/√2 = 0.707
per doubling).

    python bench/claims/grad_norm.py      # under a minute of CPU
"""

from __future__ import annotations

import math

import torch

import _curves
from batchpilot import get_workload
from batchpilot.workloads.data import fetch


def grad_sq(model, w, idx) -> float:
    model.zero_grad(set_to_none=True)
    x, y = fetch(w.train_data, idx)
    (w.loss_sum(model(x), y) / len(idx)).backward()
    return float(sum((p.grad ** 2).sum() for p in model.parameters()))


def main() -> None:
    torch.set_num_threads(1)
    w = get_workload("mnist1d-mlp")
    batches = (16, 32, 64, 128, 256, 512, 1024, 2048)
    n = w.num_train
    print("mnist1d-mlp: mean ‖g_B‖² over 40 batches; full-batch ‖G‖²; the seed's rule predicts ‖g_2B‖ / ‖g_B‖ = 0.707")
    print("| point | ‖G‖² (full batch) | " + " | ".join(f"B={b}" for b in batches) + " | fit tr(Σ) | ‖g_2B‖/‖g_B‖ |")
    print("|---|---:|" + "---:|" * (len(batches) + 2))
    for label, epochs in (("initialisation", 0), ("after 2 epochs", 2)):
        if epochs:
            model = _curves.run_curve(w, batch=32, lr=0.05, samples=epochs * n, eval_at=[]).model
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = w.make_model()
        g = torch.Generator().manual_seed(1)
        full = grad_sq(model, w, torch.arange(n))
        mean = {b: sum(grad_sq(model, w, torch.randperm(n, generator=g)[:b]) for _ in range(40)) / 40 for b in batches}
        # E|g_B|^2 = |G|^2 + (tr Σ / B)(N - B)/(N - 1) without replacement: solve for tr Σ at the smallest batch
        b0 = batches[0]
        tr = (mean[b0] - full) * b0 * (n - 1) / (n - b0)
        ratios = [math.sqrt(mean[b2] / mean[b1]) for b1, b2 in zip(batches, batches[1:])]
        print(f"| {label} | {full:.4g} | " + " | ".join(f"{mean[b]:.4g}" for b in batches)
              + f" | {tr:.4g} | " + ", ".join(f"{r:.2f}" for r in ratios) + " |")
        pred = {b: full + tr / b * (n - b) / (n - 1) for b in batches}
        print(f"| {label}: ‖G‖² + tr(Σ)/B·(N−B)/(N−1) | | " + " | ".join(f"{pred[b]:.4g}" for b in batches) + " | | |")


if __name__ == "__main__":
    main()
