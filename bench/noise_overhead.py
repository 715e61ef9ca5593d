"""Overhead of the noise-scale monitors: step time with each monitor against without, side by side, same run.

For each workload, one model copy per configuration (same initial weights, same batches): the plain
step, the per-example monitor (all layers; all examples or a subset of each batch; hooked, or ``fused=True``:
the sequence linear layers' backward computes the per-example weight gradients itself), its cheap mode
(``layers="cheap"``: the norm layers and the linear layers without positions), and the micro-batch
monitor, which needs gradient accumulation and so is paired with a plain step at the same
accumulation. Every round takes one step of every configuration, in an order that rotates round by
round, so slow changes of the machine's load hit all of them alike; every monitor observes every
step (no skipping). On a shared machine step times swing, so two figures are printed per monitor:
the ratio of medians, and the median of the paired ratios (the monitor's step over its plain
partner's step in the same round). Targets (issue 15): <= 1% on charlm, <= 3% on mnist1d-cnn.

    .venv/bin/python bench/noise_overhead.py [--workloads mnist1d-cnn,charlm,hf-tiny-gpt2] [--rounds 80]
        [--threads 1] [--subset 8] [--accumulation 4] [--every 1]      (hf-tiny-gpt2 needs transformers)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from batchpilot.noise.microbatch import GradientNoiseScale
from batchpilot.noise.per_example import PerExampleNoiseScale
from batchpilot.train import accumulate_gradients
from batchpilot.workloads import get_workload
from batchpilot.workloads.data import fetch, split_micro

DEFAULT_BATCH = {"mnist1d-cnn": 128, "mnist1d-mlp": 128, "charlm": 32, "digits-cnn-bn": 128, "hf-tiny-gpt2": 32}


def configurations(w, batch: int, accumulation: int, subset: int, every: int) -> list[dict]:
    """``name``, the monitor factory (model -> monitor or None), the micro-batch size and the plain partner."""
    micro = batch // accumulation
    out = [
        {"name": "plain", "make": None, "micro": batch, "partner": None},
        {"name": "per-example", "make": lambda m: PerExampleNoiseScale(m), "micro": batch, "partner": "plain"},
        {"name": "per-example, fused", "make": lambda m: PerExampleNoiseScale(m, fused=True), "micro": batch,
         "partner": "plain"},
        {"name": f"per-example, {subset} of {batch} examples",
         "make": lambda m: PerExampleNoiseScale(m, max_examples=subset), "micro": batch, "partner": "plain"},
        {"name": "per-example, cheap layers", "make": lambda m: PerExampleNoiseScale(m, layers="cheap"),
         "micro": batch, "partner": "plain"},
    ]
    if accumulation >= 2:
        out += [
            {"name": f"plain, {accumulation} x {micro}", "make": None, "micro": micro, "partner": None},
            {"name": f"micro-batch, {accumulation} x {micro}" + (f", every {every}" if every > 1 else ""),
             "make": lambda m: GradientNoiseScale(m, every=every), "micro": micro,
             "partner": f"plain, {accumulation} x {micro}"},
        ]
    return out


def bench_workload(name: str, batch: int, rounds: int, warmup: int, accumulation: int, subset: int,
                   every: int, seed: int = 0) -> None:
    w = get_workload(name)
    configs = configurations(w, batch, accumulation, subset, every)
    torch.manual_seed(seed)
    base = w.make_model()
    for c in configs:
        c["model"] = w.make_model()
        c["model"].load_state_dict(base.state_dict())
        c["opt"] = w.make_optimizer(c["model"].parameters(), w.base_lr)
        c["monitor"] = c["make"](c["model"]) if c["make"] is not None else None
        c["times"], c["cpu"] = [], []
    g = torch.Generator().manual_seed(seed)
    for r in range(warmup + rounds):
        idx = torch.randint(0, w.num_train, (batch,), generator=g)
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for c in order:
            model, opt, mon = c["model"], c["opt"], c["monitor"]
            t0, c0 = time.perf_counter(), time.thread_time()
            micro = [fetch(w.train_data, part) for part in split_micro(idx, c["micro"])]
            accumulate_gradients(model, micro, w.loss_sum, w.count_units,
                                 after_micro=mon.after_micro if mon is not None else None)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r >= warmup:
                c["times"].append(time.perf_counter() - t0)
                c["cpu"].append(time.thread_time() - c0)
    by_name = {c["name"]: c for c in configs}
    units = "tokens" if w.seq_len else "samples"
    print(f"\n{name}: batch {batch}, {torch.get_num_threads()} thread(s), {rounds} rounds of every configuration "
          f"(+{warmup} warm-up), order rotating; overhead against the plain partner in the same round")
    print(f"  {'configuration':40s} {'wall: median':>12s} {'paired':>8s} {'of medians':>10s}   "
          f"{'CPU: median':>11s} {'paired':>8s} {'of medians':>10s}   B_simple ({units})")
    for c in configs:
        line = f"  {c['name']:40s} {statistics.median(c['times']) * 1e3:9.2f} ms"
        if c["partner"] is None:
            line += " " * 20 + f"   {statistics.median(c['cpu']) * 1e3:8.2f} ms"
        else:
            p = by_name[c["partner"]]
            for key in ("times", "cpu"):
                if key == "cpu":
                    line += f"   {statistics.median(c['cpu']) * 1e3:8.2f} ms"
                paired = statistics.median(a / b for a, b in zip(c[key], p[key])) - 1
                ratio = statistics.median(c[key]) / statistics.median(p[key]) - 1
                line += f" {100 * paired:+7.1f}% {100 * ratio:+9.1f}%"
            est = c["monitor"].estimate()
            line += f"   {est.b_simple:,.1f} [{est.b_simple_low:,.1f}, {est.b_simple_high:,.1f}]"
            if isinstance(c["monitor"], PerExampleNoiseScale):
                line += f"; {100 * est.covered_fraction:.0f}% of its parameters"
                if est.excluded:
                    line += f" (leaves out {', '.join(est.excluded)})"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="mnist1d-cnn,charlm")
    ap.add_argument("--batch", type=int, default=None, help="global batch (default: 128, charlm 32)")
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--subset", type=int, default=8, help="examples per batch for the subset configuration")
    ap.add_argument("--accumulation", type=int, default=4, help="micro-batches for the micro-batch monitor")
    ap.add_argument("--every", type=int, default=1, help="the micro-batch monitor observes one step in N")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.workloads.split(","):
        batch = args.batch or DEFAULT_BATCH.get(name, 128)
        bench_workload(name, batch, args.rounds, args.warmup, args.accumulation, args.subset, args.every)


if __name__ == "__main__":
    main()
