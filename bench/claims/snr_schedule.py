"""Claim (seed 000, "The Sculptor's Chisel"): "to maintain a constant signal-to-noise ratio in our updates as the
gradient signal weakens near a minimum, the batch size B must grow inversely proportional to the square of the
gradient's magnitude" — B ∝ 1/|g|² as a batch schedule.

The signal-to-noise ratio of a batch-B gradient is |G|² / (tr(Σ)/B), so holding it constant needs
B ∝ tr(Σ)/|G|² = B_simple (McCandlish et al. 2018). B ∝ 1/|G|² is that rule with tr(Σ) taken as constant.
mnist1d-mlp (SGD, momentum 0.9), a fixed probe of 1,024 training samples: |G|² and tr(Σ) from 8 gradients
of 32 and one of 1,024 (the unbiased two-batch estimates, ``batchpilot.noise.two_batch_estimates``) every
``--every`` steps.

Part 1 prints |G|², tr(Σ) and B_simple along a run at batch 32 (LR 0.05): does tr(Σ) stay constant?
Part 2 trains to the workload's target (val_acc >= 0.6, at most 30 epochs) with:

* fixed batches 32 and 128 at LR 0.05 (the Smith et al. 2018 setting: the batch, not the LR, changes), and
  128 and 512 at the linear LR (0.2, 0.8; 512 was the fastest fixed batch in docs/claims.md #1);
* ``1/|G|²``: B = 32 · max_{s<=t} |G_s|² / |G_t|² (grows as the signal falls from its peak; never shrinks),
  LR 0.05, capped at the training set;
* ``B_simple``: B = max(32, running max of the measured B_simple), LR 0.05;
* each schedule again with the LR scaled linearly with the batch, capped at 0.8 (the largest linear LR that
  reached the target in docs/claims.md #1).

Steps and samples to the target are deterministic for a seed; the probe's own gradients are not counted.

    python bench/claims/snr_schedule.py      # about 2 minutes of CPU on one thread
"""

from __future__ import annotations

import argparse

import torch

import _curves
from batchpilot import get_workload
from batchpilot.noise.microbatch import two_batch_estimates
from batchpilot.workloads.data import fetch

PROBE, SMALL = 1024, 32


def grad_sq(model, w, idx) -> float:
    x, y = fetch(w.train_data, idx)
    model.zero_grad(set_to_none=True)
    (w.loss_sum(model(x), y) / len(idx)).backward()
    out = float(sum((p.grad ** 2).sum() for p in model.parameters()))
    model.zero_grad(set_to_none=True)
    return out


def measure(model, w, probe: torch.Tensor) -> tuple[float, float]:
    """(|G|², tr Σ) on the probe set."""
    small = [grad_sq(model, w, probe[i * SMALL:(i + 1) * SMALL]) for i in range(8)]
    return two_batch_estimates(small, grad_sq(model, w, probe), SMALL, len(probe))


class Schedule:
    """A controller for ``_curves.run_curve``: re-measures every ``every`` steps, batches never shrink."""

    def __init__(self, w, probe, kind: str, scale_lr: bool, every: int, base: int = 32, lr: float = 0.05) -> None:
        self.w, self.probe, self.kind, self.scale_lr, self.every = w, probe, kind, scale_lr, every
        self.base, self.lr, self.batch, self.peak_g = base, lr, base, 0.0
        self.trace: list[tuple[int, float, float, int]] = []

    def __call__(self, model, samples: int, steps: int) -> tuple[float, float]:
        if self.kind != "fixed" and steps % self.every == 0:  # "measure": record only, keep the batch
            g, tr = measure(model, self.w, self.probe)
            g = max(g, 1e-12)
            self.peak_g = max(self.peak_g, g)
            want = self.base * self.peak_g / g if self.kind == "1/|G|²" else tr / g
            if self.kind != "measure":
                self.batch = int(min(self.w.num_train, max(self.batch, round(want))))
            self.trace.append((samples, g, tr, self.batch))
        lr = min(0.8, self.lr * self.batch / 32) if self.scale_lr else self.lr  # linear from 0.05 at 32
        return self.batch, lr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--every", type=int, default=10, help="optimizer steps between measurements")
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    w = get_workload("mnist1d-mlp")
    probe = torch.randperm(w.num_train, generator=torch.Generator().manual_seed(7))[:PROBE]
    total = int(args.epochs * w.num_train)

    print("Part 1: along a run at batch 32, LR 0.05 (seed 0), measured every 25 steps")
    trace = Schedule(w, probe, "measure", False, 25)
    _curves.run_curve(w, batch=32, lr=0.05, samples=20 * w.num_train, eval_at=[], controller=trace)
    print("| epoch | ‖G‖² | tr(Σ) | B_simple = tr(Σ)/‖G‖² | 32·max‖G‖²/‖G‖² |")
    print("|---:|---:|---:|---:|---:|")
    peak = 0.0
    for i, (s, g, tr, _) in enumerate(trace.trace):
        peak = max(peak, g)
        if i % 16 == 0 or i == len(trace.trace) - 1:
            print(f"| {s / w.num_train:.1f} | {g:.4g} | {tr:.4g} | {tr / g:.0f} | {32 * peak / g:.0f} |")

    print(f"\nPart 2: to val_acc >= 0.6 (at most {args.epochs:g} epochs), seeds 0-{args.seeds - 1}; "
          f"steps / samples to the target; final batch")
    print("| schedule | LR | steps (per seed) | samples (per seed) | batch at the target |")
    print("|---|---|---|---|---|")
    arms = [("fixed 32", "fixed", False, 32), ("fixed 128", "fixed", False, 128), ("fixed 128", "fixed", True, 128),
            ("fixed 512", "fixed", True, 512),
            ("1/|G|²", "1/|G|²", False, 32),
            ("B_simple", "B_simple", False, 32), ("1/|G|²", "1/|G|²", True, 32), ("B_simple", "B_simple", True, 32)]
    evals = list(range(320, total + 1, 320))
    for label, kind, scale, base in arms:
        steps, samples, final = [], [], []
        for seed in range(args.seeds):
            ctl = Schedule(w, probe, kind, scale, args.every, base=base)
            c = _curves.run_curve(w, batch=base, lr=0.05, samples=total, eval_at=evals, seed=seed,
                                  controller=ctl, stop_at=("val_metric", ">=", 0.6))
            hit = c.steps_to("val_metric", ">=", 0.6)
            steps.append("div" if c.diverged else str(hit) if hit else "never")
            samples.append(str(c.samples_to("val_metric", ">=", 0.6) or "—"))
            final.append(str(ctl.batch))
        lr = (f"{min(0.8, 0.05 * base / 32):g}" if kind == "fixed" else "0.05·B/32 (≤ 0.8)") if scale else "0.05"
        print(f"| {label} | {lr} | {' / '.join(steps)} | {' / '.join(samples)} | {' / '.join(final)} |")


if __name__ == "__main__":
    main()
