"""Overhead of the GradientNoiseScale monitor: step time with the monitor against without, same run.

One training run of mnist1d-cnn alternates steps with and without the monitor hook (so both see
the same machine load and the same model). On a shared machine the step time swings by several
times, so three figures are printed: the ratio of medians, the median of the paired ratios of
adjacent steps (robust to slow load changes), and the time spent inside the hook itself as a share
of the step (independent of the pairing). Target: <= 3%.

    .venv/bin/python bench/noise_overhead.py [--batch 128] [--micro 32] [--steps 400] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from batchpilot.workloads.data import EpochBatchSampler, fetch, split_micro
from batchpilot.noise.microbatch import GradientNoiseScale
from batchpilot.train import accumulate_gradients
from batchpilot.workloads import get_workload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="mnist1d-cnn")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--every", type=int, default=1, help="monitor one step in N (GradientNoiseScale(every=N))")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w = get_workload(args.workload)
    torch.manual_seed(0)
    model = w.make_model()
    opt = w.make_optimizer(model.parameters(), w.base_lr)
    monitor = GradientNoiseScale(model, every=args.every)
    sampler = EpochBatchSampler(w.num_train, seed=0)
    times: dict[bool, list[float]] = {True: [], False: []}
    pairs: list[float] = []
    hook_s: list[float] = []

    def timed_hook(index: int, units: int) -> None:
        t = time.perf_counter()
        monitor.after_micro(index, units)
        hook_s.append(time.perf_counter() - t)

    for step in range(args.steps + 20):
        use = step % 2 == 0
        idx = sampler.next_batch(args.batch)
        t0 = time.perf_counter()
        micro = [fetch(w.train_data, part) for part in split_micro(idx, args.micro)]
        accumulate_gradients(model, micro, w.loss_sum, w.count_units, after_micro=timed_hook if use else None)
        if use:
            monitor.end_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 20:  # warm-up
            times[use].append(time.perf_counter() - t0)
            if not use:
                pairs.append(times[True][-1] / times[False][-1])
    with_m, without = statistics.median(times[True]), statistics.median(times[False])
    est = monitor.estimate()
    print(f"workload {args.workload}: batch {args.batch} = {args.batch // args.micro} x micro {args.micro}, "
          f"{args.threads} thread(s), {args.steps} steps alternating, monitor every {args.every} step(s)")
    print(f"median step without monitor: {without * 1e3:.3f} ms")
    print(f"median step with monitor:    {with_m * 1e3:.3f} ms")
    print(f"overhead, ratio of medians:         {100 * (with_m / without - 1):+.2f}%   (target <= 3%)")
    print(f"overhead, median of paired ratios:  {100 * (statistics.median(pairs) - 1):+.2f}%")
    active = [t for t in hook_s if t > 2e-6] or hook_s  # skipped steps return at once
    per_step_hook = sum(hook_s) / len(times[True])
    print(f"time inside the hook: median {statistics.median(active) * 1e6:.0f} us per observed micro-batch; "
          f"mean per step {per_step_hook * 1e6:.0f} us = {100 * per_step_hook / without:.2f}% of the median step")
    print(f"B_simple at the end: {est.b_simple:.1f} [{est.b_simple_low:.1f}, {est.b_simple_high:.1f}] from {est.n_updates} steps")


if __name__ == "__main__":
    main()
