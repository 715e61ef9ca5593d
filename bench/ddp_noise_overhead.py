"""Overhead of the noise scale from DDP ranks: step time with the RankNoiseScale hook against DDP's own all-reduce.

Two gloo ranks (torchrun) each hold three identical DDP replicas of a workload's model: DDP's own
C++ all-reduce, torch's Python ``allreduce_hook`` (what any Python communication hook costs), and
:class:`batchpilot.noise.ranks.RankNoiseScale`. Steps cycle through them on the same data, so all see
the same machine load. A step is the trainer's DDP step: fetch this rank's
micro-batches, all-reduce the unit count, forward/backward with ``no_sync`` on the non-final ones,
all-reduce the loss, ``end_step`` (the hooked replica), optimizer step. Printed per workload: the
ratio of median step times to DDP's own, and the median of the paired ratios of adjacent steps.
Target: <= 2%.

    .venv/bin/python bench/ddp_noise_overhead.py [--steps 300] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = (  # workload, global batch, micro-batch per rank
    ("mnist1d-mlp", 64, 16),
    ("mnist1d-cnn", 128, 32),
    ("charlm", 32, 8),
)


def worker(steps: int, out_path: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from batchpilot.workloads.data import EpochBatchSampler, fetch
    from batchpilot.noise.ranks import RankNoiseScale
    from batchpilot.train import accumulate_gradients
    from batchpilot.train.distributed import DistContext, init_distributed
    from batchpilot.workloads import get_workload

    init_distributed("cpu")
    ctx = DistContext()
    results = {}
    for name, batch, micro in CASES:
        w = get_workload(name)
        torch.manual_seed(0)
        models = [w.make_model() for _ in range(3)]
        for m in models[1:]:
            m.load_state_dict(models[0].state_dict())
        ddps = [ctx.wrap(m) for m in models]
        ddps[1].register_comm_hook(None, allreduce_hook)
        ranks = RankNoiseScale(ddps[2])
        opts = [w.make_optimizer(m.parameters(), w.base_lr) for m in models]
        sampler = EpochBatchSampler(w.num_train, seed=0)
        times: dict[int, list[float]] = {0: [], 1: [], 2: []}
        pairs: dict[int, list[float]] = {1: [], 2: []}
        for step in range(3 * (steps + 10)):
            which = step % 3
            if which == 0:
                idx = sampler.next_batch(batch)
            ctx.barrier()
            t0 = time.perf_counter()
            mb = [fetch(w.train_data, part) for part in ctx.micro_batches(idx, micro)]
            local = sum(w.count_units(y) for _, y in mb)
            total = round(ctx.all_reduce_sum([local])[0])
            if which == 2:
                ranks.begin_step(local)
            loss = accumulate_gradients(ddps[which], mb, w.loss_sum, w.count_units, total_units=total,
                                        loss_scale=float(ctx.world_size))
            ctx.all_reduce_sum([loss])
            if which == 2:
                ranks.end_step()
            opts[which].step()
            opts[which].zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            if step >= 30:  # warm-up
                times[which].append(dt)
                if which:
                    pairs[which].append(dt / times[0][-1])
        est = ranks.estimate()
        results[name] = {"batch": batch, "micro": micro, "world": ctx.world_size,
                         "params": sum(p.numel() for p in models[0].parameters()),
                         "ddp_ms": 1e3 * statistics.median(times[0]), "hook_ms": 1e3 * statistics.median(times[1]),
                         "noise_ms": 1e3 * statistics.median(times[2]),
                         "hook_paired": statistics.median(pairs[1]), "noise_paired": statistics.median(pairs[2]),
                         "b_simple": est.b_simple, "n_updates": est.n_updates}
        del ddps
    if ctx.is_main:
        with open(out_path, "w") as fh:
            json.dump(results, fh)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="timed steps per replica and workload")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.steps, args.worker)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               __file__, "--steps", str(args.steps), "--worker", out]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1800)
        with open(out) as fh:
            results = json.load(fh)
    print(f"noise scale from ranks: step-time overhead ({args.nproc} gloo ranks, 1 thread each; target <= 2%)")
    print("  columns: median step (ms) with DDP's C++ all-reduce / torch's Python allreduce_hook / RankNoiseScale;")
    print("  overhead vs DDP's own: ratio of medians (median of paired adjacent-step ratios)")
    print(f"{'workload':<12} {'params':>8} {'batch':>5} {'micro':>5} {'ddp':>7} {'hook':>7} {'noise':>7} "
          f"{'python hook':>17} {'noise scale':>17} {'B_simple':>8}")
    for name, r in results.items():
        hook = f"{r['hook_ms'] / r['ddp_ms'] - 1:+.1%} ({r['hook_paired'] - 1:+.1%})"
        noise = f"{r['noise_ms'] / r['ddp_ms'] - 1:+.1%} ({r['noise_paired'] - 1:+.1%})"
        print(f"{name:<12} {r['params']:>8,} {r['batch']:>5} {r['micro']:>5} {r['ddp_ms']:>7.2f} {r['hook_ms']:>7.2f} "
              f"{r['noise_ms']:>7.2f} {hook:>17} {noise:>17} {r['b_simple']:>8.0f}")

if __name__ == "__main__":
    main()
