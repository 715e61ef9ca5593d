"""The gradient bias BatchNorm adds under accumulation, measured (for the plan's and doctor's caveats).

For ``digits-cnn-bn`` at a few global batches B and micro-batches m, prints
``measure_bn_accumulation_bias(workload, B, m)``: ``||g_acc − g_full|| / ||g_full||`` in float64 at
the initialised model (0 without a batch-coupled layer; ``mnist1d-mlp`` is the control). For
scale it also prints the sampling noise of the gradient at batch B, ``||g_B − g_B'|| / ||g_B||`` for
two independent batches, so the bias can be read against the noise any batch already has.

Run: ``python bench/bn_accumulation_bias.py``.
"""

from __future__ import annotations

import argparse

import torch

from batchpilot import get_workload
from batchpilot.workloads.data import fetch
from batchpilot.train.bn_bias import measure_bn_accumulation_bias
from batchpilot.train.accumulation import accumulate_gradients


def sampling_noise(workload, batch: int, pairs: int = 4, seed: int = 0) -> float:
    """Mean ``||g_B − g_B'|| / ||g_B||`` over ``pairs`` pairs of disjoint random batches (float64, init)."""
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = workload.make_model().double().train()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(seed + 1)
        for _ in range(pairs):
            perm = torch.randperm(workload.num_train, generator=gen)
            grads = []
            for idx in (perm[:batch], perm[batch:2 * batch]):
                model.load_state_dict(state)
                model.zero_grad(set_to_none=True)
                x, y = fetch(workload.train_data, idx)
                accumulate_gradients(model, [(x.double(), y)], workload.loss_sum, workload.count_units)
                grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            out.append(float((grads[0] - grads[1]).norm() / grads[0].norm()))
    return sum(out) / len(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--micro", default="64,32,16,8,4,2")
    ap.add_argument("--repeats", type=int, default=8, help="random batches averaged per point")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    micro = [int(m) for m in args.micro.split(",")]
    print(f"{'workload':<15}{'B':>5}{'m':>5}{'accum':>7}{'bias |g_acc-g|/|g|':>22}{'noise |g_B-g_B`|/|g_B|':>26}")
    for name in ("digits-cnn-bn", "mnist1d-mlp"):
        w = get_workload(name)
        for b in (int(x) for x in args.batches.split(",")):
            noise = sampling_noise(w, b)
            for m in (x for x in micro if x < b):
                bias = measure_bn_accumulation_bias(w, b, m, batches=args.repeats)
                print(f"{name:<15}{b:>5}{m:>5}{b // m:>7}{bias:>22.3e}{noise:>26.3f}")


if __name__ == "__main__":
    main()
