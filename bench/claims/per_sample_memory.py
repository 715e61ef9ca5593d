"""Claim (seed 002, pattern 6, "Step 2: Estimate per-sample memory"): "Run small batch (8), measure memory →
Divide by 8 to get per-sample → Max batch = Available Memory / per-sample", with "Available for batch = Total −
(params + opt state)" from its step 1.

The peak at batch 8 also holds the weights, the gradients, the optimizer state and the step's other fixed
buffers, so dividing it by 8 counts them as per-sample memory. batchpilot's memory trace (fake tensors, a full
fp32 training step for a CUDA target, nothing allocated) fits M(B) = fixed + per_sample·B; this script puts the
seed's recipe next to it for a 24 GiB GPU (the seed's example), on the built-in workloads and GPT-2 small:

* seed per-sample = M(8) / 8; seed max batch = (usable − params − optimizer state) / that;
* traced per-sample = the fitted slope; max batch = batchpilot's ``max_micro_batch`` for the same usable bytes;
* the trace's own peak at the seed's max batch, which is how far the recipe stays below the budget.

    python bench/claims/per_sample_memory.py      # about a minute (GPT-2 small: most of it)
"""

from __future__ import annotations

import argparse

import torch

from batchpilot import get_workload
from batchpilot.memory import format_bytes, memory_curve, resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="mnist1d-mlp,mnist1d-cnn,charlm,hf:gpt2")
    ap.add_argument("--device", default="24GiB")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = resolve_device(args.device)
    usable = device.usable_bytes
    print(f"{device.name}: {format_bytes(usable)} usable for the step's tensors (batchpilot's overheads and margin)")
    print("| workload | M(8) | seed per-sample = M(8)/8 | traced per-sample | ratio | params + optimizer state "
          "| seed max batch | traced max batch | traced peak at the seed's max |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.workloads.split(","):
        w = get_workload(name)
        curve = memory_curve(w, batch_sizes=(8, 64, 512), device="cuda")
        m8 = curve.peak_bytes_at[8]
        b = curve.breakdown
        static = b.get("params", 0) + b.get("optimizer_state", 0)
        seed_per = m8 / 8
        seed_max = int((usable - static) // seed_per)
        true_max = curve.max_micro_batch(usable)
        print(f"| {name} | {format_bytes(m8)} | {format_bytes(seed_per)} | {format_bytes(curve.per_sample_bytes)} | "
              f"{seed_per / curve.per_sample_bytes:.2f}× | {format_bytes(static)} | {seed_max:,} | {true_max:,} | "
              f"{curve.peak_bytes(seed_max) / usable:.0%} of usable |", flush=True)


if __name__ == "__main__":
    main()
