"""Validate the traced memory prediction against real CPU allocations (bench figures, not asserts).

For each built-in workload: fit M(B) from fake-tensor traces at b, 2b, 4b (b = base batch),
then run real training steps at several batches and measure the peak of torch's CPU
allocations from the allocator's own events (``torch.profiler`` ``profile_memory``;
see docs/memory.md). A second, OS-level check reads the process's peak RSS (VmHWM,
reset through /proc/self/clear_refs) in a fresh subprocess for the largest batch.
Then, for a byte budget, the largest micro-batch the curve predicts is compared with
the true largest one found by real measurement (bisection).

Run:  .venv/bin/python bench/memory_cpu_validation.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import date

import torch

from batchpilot.memory import format_bytes, memory_curve
from batchpilot.memory.measure import measure_step
from batchpilot.workloads import get_workload

CASES = {
    "mnist1d-mlp": [8, 64, 512, 2048],
    "mnist1d-cnn": [8, 64, 512, 2048],
    "digits-cnn-bn": [8, 64, 512, 1024],
    "charlm": [4, 32, 256, 512],
}
OPTION_CASES = [("charlm", dict(checkpointing=True), 256), ("charlm", dict(amp=True), 256),
                ("charlm", dict(dtype="bfloat16"), 256), ("mnist1d-cnn", dict(amp=True), 512),
                ("digits-cnn-bn", dict(checkpointing=True), 512)]
BUDGET_AT = {"mnist1d-mlp": 3000, "mnist1d-cnn": 1500, "digits-cnn-bn": 700, "charlm": 300}
"""The byte budget of the max-batch check is the real peak at this batch plus half a sample."""

RSS_SNIPPET = r"""
import sys, torch, json
from batchpilot.workloads import get_workload
name, batch = sys.argv[1], int(sys.argv[2])
w = get_workload(name)
items = [w.train_data[i % w.num_train] for i in range(batch)]
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
torch.manual_seed(0)
import gc; gc.collect()
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
model = w.make_model(); opt = w.make_optimizer(model.parameters(), w.base_lr)
x = torch.stack([a for a, _ in items]); y = torch.stack([b for _, b in items])
units = batch * max(1, y[0].numel())
for _ in range(2):
    loss = w.loss_sum(model(x), y) / units
    loss.backward(); del loss
    opt.step(); opt.zero_grad(set_to_none=True)
print(json.dumps({"hwm_minus_before": status("VmHWM:") - before}))
"""


def rss_peak(name: str, batch: int) -> int | None:
    try:
        out = subprocess.run([sys.executable, "-c", RSS_SNIPPET, name, str(batch)], capture_output=True, text=True,
                             timeout=600, check=True).stdout
        return int(json.loads(out.strip().splitlines()[-1])["hwm_minus_before"])
    except Exception:  # noqa: BLE001 - the OS-level check is optional
        return None


def true_max_batch(name: str, budget: float, lo: int, hi: int, **opts) -> int:
    """Largest batch whose real peak fits in ``budget`` (bisection on real measurements)."""
    w = get_workload(name)
    while measure_step(w, hi, **opts).peak_bytes <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure_step(w, mid, **opts).peak_bytes <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two batches per workload, no options, no RSS")
    args = ap.parse_args()
    print(f"# memory_cpu_validation  {date.today()}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    rows = []
    print(f"\n{'workload':<14}{'options':<22}{'batch':>6}{'predicted':>13}{'measured':>13}{'error':>9}{'RSS peak':>13}")
    curves = {}
    for name, batches in CASES.items():
        w = get_workload(name)
        t0 = time.perf_counter()
        curve = memory_curve(w)
        curves[name] = curve
        print(f"  [{name}: fit {format_bytes(curve.fixed_bytes)} + {format_bytes(curve.per_sample_bytes)}/sample "
              f"from B={sorted(curve.peak_bytes_at)}, residual {curve.residual_frac:.2%}, {time.perf_counter() - t0:.1f} s]")
        use = batches[1::2] if args.quick else batches
        for b in use:
            pred = curve.peak_bytes(b)
            real = measure_step(w, b).peak_bytes
            rss = rss_peak(name, b) if (b == use[-1] and not args.quick) else None
            err = (pred - real) / real
            rows.append(err)
            print(f"{name:<14}{'fp32':<22}{b:>6}{format_bytes(pred):>13}{format_bytes(real):>13}{err:>+9.2%}"
                  f"{format_bytes(rss) if rss else '':>13}")
    if not args.quick:
        for name, opts, b in OPTION_CASES:
            w = get_workload(name)
            curve = memory_curve(w, **opts)
            pred = curve.peak_bytes(b)
            real = measure_step(w, b, **opts).peak_bytes
            err = (pred - real) / real
            rows.append(err)
            label = ",".join(f"{k}={v}" for k, v in opts.items())
            print(f"{name:<14}{label:<22}{b:>6}{format_bytes(pred):>13}{format_bytes(real):>13}{err:>+9.2%}")
    abs_err = [abs(e) for e in rows]
    print(f"\npeak error over {len(rows)} cases: median |error| {statistics.median(abs_err):.2%}, "
          f"worst {max(abs_err):.2%}   (targets: median <= 3%, worst <= 8%)")

    print(f"\n{'workload':<14}{'budget':>12}{'predicted max':>15}{'true max':>10}{'ratio':>8}")
    ok = True
    for name, at in BUDGET_AT.items():
        w = get_workload(name)
        curve = curves[name]
        budget = measure_step(w, at).peak_bytes + curve.per_sample_bytes / 2
        pred = curve.max_micro_batch(budget)
        true = true_max_batch(name, budget, lo=max(1, at // 2), hi=at)
        ratio = pred / true
        ok &= pred <= true and ratio >= 0.9
        print(f"{name:<14}{format_bytes(budget):>12}{pred:>15}{true:>10}{ratio:>8.3f}")
    print(f"max-batch target (never above the true max, >= 90% of it): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
