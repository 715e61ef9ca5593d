"""Time to target: the noise-adaptive batch controller against the best fixed batch of a sweep.

For each workload, in one process:

1. **The sweep**: every fixed global batch of ``--batches`` times every LR multiplier of ``--lr-mults``
   (on top of the LR the workload's rule gives that batch from its base point: square root for the
   Adam family, linear for SGD), trained until the target or ``--max-epochs``.
2. **The adaptive controller** (``TrainConfig(adaptive=True)``, :mod:`batchpilot.train.adaptive`) from
   the base batch with the base LR, the LR following the AdaScale gain (SGD) or the rule (Adam), four
   ways: the per-example monitor on its default schedule (every step, the interval doubling after each
   decision that keeps the batch, up to 16), the per-example monitor at every step, and the
   micro-batch monitor on its default schedule (every 4th step split in two, the interval doubling up to
   16 after each decision that keeps the batch; the controller's default) and at every 4th step, or only some of them
   (``--adaptive-estimator``). Its candidates run from ``max(2, B0/8)`` to the sweep's largest batch.
3. **Step times, interleaved**: rounds of one step of every (batch, kind) pair, in an order that
   rotates round by round — a plain step, a step with the per-example monitor, a step split in two
   with the micro-batch monitor — so machine load drifts hit them alike. A monitored step's time is
   the plain median times the median of its paired ratios.

Training runs are deterministic (one thread, fixed seeds), so their *steps* to target do not depend on
the machine's load; the *time* to target is computed from the step-time table: a fixed run's steps
times its batch's step time; an adaptive run's sum over its steps of its batch's plain or monitored
step time, plus its throughput probe if it ran one (four unsplit steps at each batch probed: every
candidate with ``--adaptive-throughput probe``; none with the default step-time model and the
micro-batch monitor, which times the training steps themselves). Evaluation runs
every ``--eval-samples`` samples' worth of steps at the run's starting batch (for the adaptive runs:
at the base batch, so coarser once the batch has grown; it counts against the controller) and is not
timed. Prints the table and ``adaptive / best fixed`` (issue 15's goal: <= 0.9 on two of three
workloads, never above 1.05).

    .venv/bin/python bench/adaptive_vs_fixed.py [--workloads mnist1d-cnn,mnist1d-mlp,charlm]
        [--seeds 1] [--rounds 12] [--json out.json]          (about 15-20 minutes on one thread)
        [--adaptive-estimator micro-batch] [--fixed-from earlier.json]   (the sweep reused: a few minutes)
        [--adaptive-noise-window 8|all]        (the noise scale over the last 8 observed steps, or the EMAs)
        [--adaptive-throughput steps|probe]   (the controller's samples/s: its own steps, or the probe)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from batchpilot import get_workload
from batchpilot.noise.microbatch import GradientNoiseScale
from batchpilot.noise.per_example import PerExampleNoiseScale
from batchpilot.scaling.lr_rules import default_lr_rule, scale_lr
from batchpilot.train import TrainConfig, Trainer, accumulate_gradients
from batchpilot.workloads.data import fetch, split_micro

DEFAULTS = {  # batches of the sweep, the controller's limit, the target, max epochs, eval granularity (samples)
    "mnist1d-cnn": dict(batches="32,64,128,256,512", max_batch=512, target=None, max_epochs=30, eval_samples=32),
    "mnist1d-mlp": dict(batches="32,64,128,256,512", max_batch=512, target=None, max_epochs=40, eval_samples=32),
    "charlm": dict(batches="16,32,64,128", max_batch=128, target="val_loss<=2.4", max_epochs=6, eval_samples=64),
}
ADAPTIVE = {"adaptive, per-example (default)": ("per-example", None),
            "adaptive, per-example every step": ("per-example", 1),
            "adaptive, micro-batch (default)": ("micro-batch", None),
            "adaptive, micro-batch every 4": ("micro-batch", 4)}


def run_fixed(w, batch: int, lr: float, seed: int, opts: dict) -> dict:
    cfg = TrainConfig(global_batch=batch, lr=lr, epochs=opts["max_epochs"], seed=seed, stop_at_target=True,
                      eval_every=max(1, opts["eval_samples"] // batch), target=opts["target"])
    r = Trainer(w, cfg).run()
    return {"steps": r.steps_to_target, "changes": [[1, batch]], "monitored": []}


def run_adaptive(w, estimator: str, every: int, seed: int, opts: dict) -> dict:
    cfg = TrainConfig(global_batch=w.base_batch, adaptive=True, max_batch=opts["max_batch"],
                      adaptive_estimator=estimator, adaptive_throughput=opts.get("throughput", "steps"),
                      adaptive_noise_window=opts.get("noise_window", 8), epochs=opts["max_epochs"], seed=seed, stop_at_target=True,
                      eval_every=max(1, opts["eval_samples"] // w.base_batch), target=opts["target"])
    trainer = Trainer(w, cfg)
    if every is not None:
        trainer.batching.monitor_every, trainer.batching.backoff = every, False
    r = trainer.run()
    drv = trainer.batching
    return {"steps": r.steps_to_target, "changes": [list(c) for c in r.batch_sizes],
            "observed": list(drv.observed_steps),
            "candidates": list(drv.candidates), "probed": list(drv.probed),
            "b_noise": [round(d["b_noise"], 1) for d in drv.decisions],
            "fits_ms": [[d["step"], round(1e3 * d["fixed_s"], 3), round(1e3 * d["per_sample_s"], 5)]
                        for d in drv.decisions if "fixed_s" in d],
            "timed_steps_ms": {b: round(1e3 * statistics.median(ts), 3) for b, ts in drv.step_timer.times.items()},
            "probe_samples_per_s": None if drv.throughput is None else
            dict(zip(drv.throughput.batches, [round(s, 1) for s in drv.throughput.samples_per_s]))}


def step_times(w, batches: list[int], rounds: int, seed: int = 0) -> dict[int, dict[str, float]]:
    """Median step time per batch (ms): plain, and each monitored kind (plain x median paired ratio)."""
    torch.manual_seed(seed)
    base = w.make_model()
    kinds = []
    for b in batches:
        for kind in ("plain", "per-example", "micro-batch"):
            m = w.make_model()
            m.load_state_dict(base.state_dict())
            mon = PerExampleNoiseScale(m) if kind == "per-example" else GradientNoiseScale(m) if kind == "micro-batch" else None
            kinds.append({"b": b, "kind": kind, "model": m, "opt": w.make_optimizer(m.parameters(), w.base_lr),
                          "mon": mon, "t": []})
    g = torch.Generator().manual_seed(seed)
    for r in range(rounds + 2):
        idx = {b: torch.randint(0, w.num_train, (b,), generator=g) for b in batches}
        for k in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
            t0 = time.thread_time()
            pieces = 2 if k["kind"] == "micro-batch" else 1
            micro = [fetch(w.train_data, p) for p in split_micro(idx[k["b"]], math.ceil(k["b"] / pieces))]
            accumulate_gradients(k["model"], micro, w.loss_sum, w.count_units,
                                 after_micro=k["mon"].after_micro if k["mon"] is not None else None)
            k["opt"].step()
            k["opt"].zero_grad(set_to_none=True)
            if r >= 2:
                k["t"].append(time.thread_time() - t0)
    out: dict[int, dict[str, float]] = {}
    for b in batches:
        plain = next(k for k in kinds if k["b"] == b and k["kind"] == "plain")
        row = {"plain": statistics.median(plain["t"]) * 1e3}
        for k in kinds:
            if k["b"] == b and k["kind"] != "plain":
                row[k["kind"]] = row["plain"] * statistics.median(a / p for a, p in zip(k["t"], plain["t"]))
        out[b] = row
    return out


def run_time_ms(run: dict, table: dict[int, dict[str, float]]) -> float:
    """Time to target from the step-time table (inf when the target was not reached)."""
    if run["steps"] is None:
        return math.inf
    kind = run.get("kind")
    observed = set(run.get("observed", ()))
    total, changes = 0.0, run["changes"] + [[run["steps"] + 1, None]]
    for (start, b), (nxt, _) in zip(changes, changes[1:]):
        for step in range(start - 1, min(nxt - 1, run["steps"])):  # 0-based steps with this batch
            monitored = kind is not None and step in observed
            total += table[b][kind if monitored else "plain"]
    probed = run.get("probed")
    if probed is None and run.get("probe"):  # a JSON from before the step-time model: every candidate
        probed = run["candidates"]
    total += sum(4 * table[c]["plain"] for c in probed or ())
    return total


def bench_workload(name: str, seeds: int, lr_mults: list[float], rounds: int, batches: str | None = None,
                   stored: dict | None = None, adaptive: dict | None = None, fixed_from: dict | None = None,
                   throughput: str = "steps", noise_window: int | None = 8) -> dict:
    """One workload: the sweep (or ``fixed_from``'s stored fixed runs), the ``adaptive`` variants (all of
    :data:`ADAPTIVE` by default), the step-time table and the ratios. ``stored``: reuse every run."""
    adaptive = ADAPTIVE if adaptive is None else adaptive
    w = get_workload(name)
    opts = dict(DEFAULTS.get(name, DEFAULTS["mnist1d-cnn"]))
    if batches:
        opts["batches"] = batches
        opts["max_batch"] = max(int(x) for x in batches.split(","))
    opts["target"] = opts["target"] or str(w.target)
    opts["throughput"], opts["noise_window"] = throughput, noise_window
    batches = [int(x) for x in opts["batches"].split(",")]
    rule = default_lr_rule(w.optimizer_family())
    print(f"\n{name}: target {opts['target']}, base batch {w.base_batch}, base LR {w.base_lr:g} ({rule} rule), "
          f"sweep {batches} x LR {lr_mults}, {seeds} seed(s)", flush=True)
    runs: dict[str, list[dict]] = stored["runs"] if stored else {}
    if fixed_from and not stored:
        runs.update({k: v for k, v in fixed_from["runs"].items() if k.startswith("fixed")})
    t0 = time.time()
    for seed in range(0 if stored else seeds):
        for b in ([] if fixed_from else batches):
            for mult in lr_mults:
                lr = scale_lr(w.base_lr, w.base_batch, b, rule) * mult
                runs.setdefault(f"fixed {b}, LR x{mult:g}", []).append(run_fixed(w, b, lr, seed, opts))
        for label, (estimator, every) in adaptive.items():
            run = run_adaptive(w, estimator, every, seed, opts)
            run["kind"] = estimator
            runs.setdefault(label, []).append(run)
    train_s = time.time() - t0
    sizes = sorted(set(batches) | {c for rs in runs.values() for r in rs for c in r.get("candidates", [])}
                   | {b for rs in runs.values() for r in rs for _, b in r["changes"]})
    table = step_times(w, sizes, rounds)
    print(f"  step times (ms of thread CPU time, {rounds} interleaved rounds): " + "; ".join(
        f"{b}: {t['plain']:.1f} (per-example {100 * (t['per-example'] / t['plain'] - 1):+.0f}%, "
        f"split+micro-batch {100 * (t['micro-batch'] / t['plain'] - 1):+.0f}%)" for b, t in table.items()))
    medians = {}
    for label, rs in runs.items():
        times = [run_time_ms(r, table) / 1e3 for r in rs]
        medians[label] = statistics.median(times)
        steps = [r["steps"] for r in rs]
        extra = ""
        if "changes" in rs[0] and label.startswith("adaptive"):
            n_obs = len([s for s in rs[0]["observed"] if rs[0]["steps"] is not None and s < rs[0]["steps"]])
            extra = (f"  batches {rs[0]['changes']}; {n_obs} steps observed; "
                     f"B_noise at decisions {rs[0]['b_noise'][:6]}...; probed {rs[0].get('probed')}; "
                     f"fits (step, fixed ms, per-sample ms) {rs[0].get('fits_ms', [])[:4]}...")
        print(f"  {label:34s} {medians[label]:8.2f} s   steps {steps}{extra}")
    fixed = {k: v for k, v in medians.items() if k.startswith("fixed")}
    best = min(fixed, key=fixed.get)
    ratios = {k: medians[k] / fixed[best] for k in medians if k.startswith("adaptive")}
    print(f"  best fixed: {best} ({fixed[best]:.2f} s); " + "; ".join(f"{k} / best = {v:.3f}" for k, v in ratios.items())
          + f"   (training runs took {train_s:.0f} s of wall time)", flush=True)
    return {"runs": runs, "table": {str(b): t for b, t in table.items()}, "medians": medians, "best_fixed": best,
            "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="mnist1d-cnn,mnist1d-mlp,charlm")
    ap.add_argument("--lr-mults", default="0.5,1,2", help="LR multipliers of the fixed-batch sweep")
    ap.add_argument("--batches", default=None, help="the sweep's batches for every workload (and the controller's limit)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=12, help="interleaved rounds of the step-time table")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--retime", default=None, metavar="JSON",
                    help="reuse the training runs of an earlier --json and only measure the step times again")
    ap.add_argument("--adaptive-estimator", default="all", choices=("all", "micro-batch", "per-example", "none"),
                    help="which adaptive variants to train: all three, the micro-batch one (the controller's "
                         "default), the two per-example ones, or none (the sweep only)")
    ap.add_argument("--adaptive-throughput", default="steps", choices=("steps", "probe"),
                    help="the controller's samples/s: a model fitted to its own steps (the default) or the probe "
                         "of every candidate at the first decision")
    ap.add_argument("--adaptive-noise-window", default="8",
                    help="observed steps each decision reads the noise scale over, or 'all' (the monitor's EMAs)")
    ap.add_argument("--fixed-from", default=None, metavar="JSON",
                    help="reuse the fixed-batch sweep of an earlier --json; train the adaptive runs again")
    args = ap.parse_args()
    adaptive = {k: v for k, v in ADAPTIVE.items() if args.adaptive_estimator in ("all", v[0])}
    torch.set_num_threads(args.threads)
    mults = [float(x) for x in args.lr_mults.split(",")]
    stored = json.load(open(args.retime)) if args.retime else {}
    fixed_from = json.load(open(args.fixed_from)) if args.fixed_from else {}
    names = list(stored) if stored else args.workloads.split(",")
    out = {name: bench_workload(name, args.seeds, mults, args.rounds, args.batches, stored.get(name), adaptive,
                                fixed_from.get(name), args.adaptive_throughput,
                                None if args.adaptive_noise_window == "all" else int(args.adaptive_noise_window))
           for name in names}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
