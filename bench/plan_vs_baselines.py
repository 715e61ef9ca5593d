"""Must-show: the planned batch reaches the target faster than batch 32 and than the largest batch
that fits with linear LR scaling, measured in one run.

The script plans the workload (in-process, as ``batchpilot plan`` does), then trains three configs
to the workload's target, interleaved over seeds so that they share the machine's load:

* **planned**: the plan's micro-batch, accumulation, LR and warmup;
* **base**: batch 32 (the workload's base batch) at its base LR, no warmup;
* **largest**: the largest batch that fits (memory model, capped by the training set), with the
  LR scaled *linearly* (Goyal et al. 2017) and the planner's warmup for that jump.

All runs use the thread count the plan measured with. Training time excludes evaluation. On a
shared machine wall time swings with the load, so a second, load-robust figure is printed too:
the median steps to the target times each config's step time, measured interleaved (round-robin)
so that all configs see the same load.

    .venv/bin/python bench/plan_vs_baselines.py [--workload mnist1d-cnn] [--seeds 3] [--memory 16MiB]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from batchpilot.plan import make_plan
from batchpilot.scaling.lr_rules import scale_lr
from batchpilot.throughput.measure import PeakFlops, measure_throughput
from batchpilot.train import TrainConfig, Trainer
from batchpilot.workloads import get_workload


class _Cap(Exception):
    pass


def time_to_target(workload, *, batch, micro, lr, warmup, seed, cap_s, max_epochs):
    """Train to the workload's target; returns (seconds, steps) or (None, steps) when not reached."""
    cfg = TrainConfig(global_batch=batch, micro_batch_per_rank=micro, lr=lr, warmup_steps=warmup, seed=seed,
                      epochs=max_epochs, eval_every=max(1, math.ceil(800 / batch)), stop_at_target=True)
    last = {"step": 0, "wall_s": 0.0}

    def on_step(record):
        last.update(step=record["step"], wall_s=record["wall_s"])
        if record["wall_s"] > cap_s:
            raise _Cap

    try:
        result = Trainer(workload, cfg, on_step=on_step).run()
    except _Cap:
        return None, last["step"], "time cap"
    if result.time_to_target_s is None:
        return None, result.steps, result.status
    return result.time_to_target_s, result.steps_to_target, result.status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="mnist1d-cnn")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--memory", default=None, help="plan for this much memory (changes 'largest that fits')")
    ap.add_argument("--cap", type=float, default=60.0, help="seconds of training before a run counts as not reaching the target")
    ap.add_argument("--max-epochs", type=float, default=300.0)
    args = ap.parse_args()
    w = get_workload(args.workload)
    t0 = time.perf_counter()
    plan = make_plan(w, memory=args.memory, device="cpu" if args.memory else None)
    plan_s = time.perf_counter() - t0
    torch.set_num_threads(plan.threads)
    largest = plan.alternatives["largest_that_fits"]
    lb = largest["global_batch"]
    configs = {
        "planned": dict(batch=plan.global_batch, micro=plan.micro_batch_per_rank, lr=plan.lr, warmup=plan.warmup_steps),
        "base": dict(batch=w.base_batch, micro=None, lr=w.base_lr, warmup=0),
        "largest": dict(batch=lb, micro=largest["micro_batch_per_rank"],
                        lr=scale_lr(w.base_lr, w.base_batch, lb, "linear"), warmup=largest["warmup_steps"]),
    }
    print(f"plan of {w.name} took {plan_s:.1f} s; threads {plan.threads}; B_noise {plan.noise_scale:.0f}; "
          f"predicted {plan.predicted_steps_to_target} steps / {plan.predicted_time_to_target_s or float('nan'):.2f} s")
    for name, c in configs.items():
        print(f"  {name:8s} batch {c['batch']:5d} micro {c['micro'] or c['batch']:5d} lr {c['lr']:.4g} warmup {c['warmup']}")
    results: dict[str, list] = {k: [] for k in configs}
    for seed in range(args.seeds):
        for name, c in configs.items():
            t, steps, status = time_to_target(w, seed=seed, cap_s=args.cap, max_epochs=args.max_epochs, **c)
            results[name].append((t, steps, status))
            print(f"seed {seed} {name:8s}: " + (f"{t:.2f} s, {steps} steps" if t is not None else
                                                f"target not reached ({status}, {steps} steps)"), flush=True)
    med = {}
    for name, rs in results.items():
        times = [t if t is not None else math.inf for t, _, _ in rs]
        med[name] = statistics.median(times)
    print("\nmedian training time to the target "
          f"({w.target}): " + ", ".join(f"{k} {v:.2f} s" if math.isfinite(v) else f"{k} not reached (> {args.cap:.0f} s)"
                                        for k, v in med.items()))
    for other in ("base", "largest"):
        ratio = med[other] / med["planned"]
        shown = f"{ratio:.2f}x" if math.isfinite(ratio) else f"> {args.cap / med['planned']:.1f}x (not reached)"
        print(f"wall time, {other} / planned: {shown}")
    # load-robust: median steps x interleaved step time
    step_s: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(5):
        for name, c in configs.items():
            micro = c["micro"] or c["batch"]
            curve = measure_throughput(w, batch_sizes=[micro], warmup_steps=2, timed_steps=5, peak=PeakFlops(1.0, "-"))
            step_s[name].append(curve.step_s(micro, c["batch"] // micro))
    est = {}
    for name, rs in results.items():
        steps = statistics.median([s if t is not None else math.inf for t, s, _ in rs])
        est[name] = steps * statistics.median(step_s[name])
        print(f"{name:8s}: median steps to target {steps}, interleaved step time "
              f"{statistics.median(step_s[name]) * 1e3:.2f} ms -> {est[name]:.2f} s")
    for other in ("base", "largest"):
        ratio = est[other] / est["planned"]
        print(f"steps x step time, {other} / planned: " + (f"{ratio:.2f}x" if math.isfinite(ratio) else "not reached"))


if __name__ == "__main__":
    main()
