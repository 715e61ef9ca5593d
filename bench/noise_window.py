"""The noise monitor's EMA against a window of recent steps, early in training, against a frozen-weight reference.

Trains a workload at its base batch (one thread, fixed seed); every 4th step is split in two
micro-batches and fed to a :class:`~batchpilot.noise.microbatch.GradientNoiseScale`, as the adaptive
controller's default monitor does. Every ``--every`` steps it prints:

- the monitor's EMA reading (``estimate()``: bias-corrected EMAs of ``|G|²`` and ``tr(Σ)`` over all
  observed steps),
- the window reading (``estimate(recent=8)``: the ratio of the means of the last 8 observed steps),
- a reference computed apart from the monitor: at the current (frozen) weights, ``--draws`` pairs of
  gradients at 4 and 4·B samples (the small batch a prefix of the large one), and McCandlish et al.
  (2018, App. A)'s two-batch estimator on the means of their squared norms.

B_simple in samples (sequences for charlm). The point: whether the EMA lags the noise scale while
``|G|²`` falls fast.

    .venv/bin/python bench/noise_window.py --workload charlm --steps 160 --every 40     (about 3 minutes)
"""

from __future__ import annotations

import argparse

import torch

from batchpilot import get_workload
from batchpilot.noise.microbatch import GradientNoiseScale
from batchpilot.workloads.data import fetch


def grads(model, params, w, idx, per: str = "sample") -> list[torch.Tensor]:
    """The gradient of the loss summed over ``idx``'s samples, divided by their samples (B_simple in
    samples) or, as the trainer does, by their units (``per="unit"``: tokens for charlm)."""
    model.zero_grad(set_to_none=True)
    x, y = fetch(w.train_data, idx)
    (w.loss_sum(model(x), y) / (len(idx) if per == "sample" else w.count_units(y))).backward()
    return [p.grad.detach().clone() for p in params]


def sq(gs) -> float:
    return sum(float((g * g).sum()) for g in gs)


def frozen_b_simple(model, params, w, gen, big: int, small: int, draws: int) -> float:
    """Two-batch estimator on ``draws`` independent draws at the current weights (nothing updated)."""
    s_small = s_big = 0.0
    for _ in range(draws):
        idx = torch.randperm(w.num_train, generator=gen)[:big]
        s_big += sq(grads(model, params, w, idx))
        s_small += sq(grads(model, params, w, idx[:small]))
    a, c = s_small / draws, s_big / draws
    g2 = (big * c - small * a) / (big - small)
    tr = (a - c) / (1 / small - 1 / big)
    return tr / g2 if g2 > 0 else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="charlm")
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--every", type=int, default=40)
    ap.add_argument("--draws", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    w = get_workload(args.workload)
    torch.manual_seed(args.seed)
    model = w.make_model()
    opt = w.make_optimizer(model.parameters(), w.base_lr)
    params = [p for p in model.parameters() if p.requires_grad]
    b, n = w.base_batch, w.num_train
    mon = GradientNoiseScale(confidence=0.5)
    gen, ref_gen = torch.Generator().manual_seed(args.seed + 1), torch.Generator().manual_seed(args.seed + 2)
    print(f"{w.name}: batch {b}, every 4th step split in two; B_simple in samples")
    print(f"{'step':>5} {'EMA':>8} {'last 8':>8} {'frozen ref':>10}")
    for step in range(args.steps + 1):
        if step % args.every == 0 and step > 0:
            ema, win = mon.estimate(), mon.estimate(recent=8)
            ref = frozen_b_simple(model, params, w, ref_gen, 4 * b, 4, args.draws)
            print(f"{step:>5} {ema.b_simple:>8.1f} {win.b_simple:>8.1f} {ref:>10.1f}", flush=True)
        idx = torch.randperm(n, generator=gen)[:b]
        if step % 4 == 0:  # the monitor's two batch sizes: two halves, and their sum
            halves = (idx[: b // 2], idx[b // 2:])
            first = grads(model, params, w, halves[0])
            second = grads(model, params, w, halves[1])
            full = [(f + s) / 2 for f, s in zip(first, second)]
            mon.update([sq(first), sq(second)], sq(full), b // 2, b)
            units_per_sample = w.count_units(fetch(w.train_data, idx)[1]) / b
            for p, g in zip(params, full):  # the step the trainer takes: the loss per unit
                p.grad = g / units_per_sample
        else:
            grads(model, params, w, idx, per="unit")
        opt.step()


if __name__ == "__main__":
    main()
