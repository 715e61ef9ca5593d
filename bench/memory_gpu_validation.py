"""Validate the traced prediction on a real GPU (bench figures; exits 0 with a note when no CUDA).

For mnist1d-cnn, charlm and GPT-2 small (``hf:gpt2``, needs ``batchpilot[hf]``):

1. Peak error: the CUDA-target curve's ``peak_bytes(B)`` against ``torch.cuda.max_memory_allocated``
   over two real training steps (state creation + steady state), minus what was allocated before.
2. Max batch: the prediction for this GPU's usable memory against the largest micro-batch the
   OOM-safe probe finds when allowed the whole device (``find_max_batch`` with tolerance 0).

Run:  .venv/bin/python bench/memory_gpu_validation.py [--workloads charlm,hf:gpt2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date

import torch

from batchpilot.memory import format_bytes, memory_curve, probe_workload, resolve_device
from batchpilot.workloads import get_workload

BATCHES = {"mnist1d-cnn": [64, 1024, 16384], "charlm": [32, 256, 1024], "hf:gpt2": [1, 2, 4, 8]}


def real_peak(workload, batch: int) -> int:
    """max_memory_allocated over two real steps, above what was allocated before the model existed."""
    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.random.fork_rng(devices=[0]):
        model = workload.make_model().to(dev)
        opt = workload.make_optimizer(model.parameters(), workload.base_lr)
        n = workload.num_train
        items = [workload.train_data[i % n] for i in range(batch)]
        x = torch.stack([a for a, _ in items]).to(dev)
        y = torch.stack([b for _, b in items]).to(dev)
        units = batch * max(1, y[0].numel())
        for _ in range(2):
            loss = workload.loss_sum(model(x), y) / units
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del model, opt, x, y
    torch.cuda.empty_cache()
    return int(peak)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default=",".join(BATCHES))
    ap.add_argument("--no-probe", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("memory_gpu_validation: no CUDA device here; nothing measured (run it on a GPU machine)")
        return 0
    device = resolve_device("cuda")
    print(f"# memory_gpu_validation  {date.today()}  {device.describe()}  torch {torch.__version__}")
    errors = []
    print(f"\n{'workload':<14}{'batch':>7}{'predicted':>13}{'measured':>13}{'error':>9}")
    curves = {}
    for name in args.workloads.split(","):
        try:
            w = get_workload(name)
        except Exception as exc:  # noqa: BLE001 - e.g. transformers missing
            print(f"{name:<14} skipped: {exc}")
            continue
        t0 = time.perf_counter()
        curve = memory_curve(w, device="cuda")
        curves[name] = (w, curve)
        print(f"  [{name}: traced B={sorted(curve.peak_bytes_at)} in {time.perf_counter() - t0:.1f} s]")
        for b in BATCHES.get(name, [w.base_batch]):
            try:
                real = real_peak(w, b)
            except torch.OutOfMemoryError:
                print(f"{name:<14}{b:>7}   OOM")
                torch.cuda.empty_cache()
                continue
            pred = curve.peak_bytes(b)
            err = (pred - real) / real
            errors.append(err)
            print(f"{name:<14}{b:>7}{format_bytes(pred):>13}{format_bytes(real):>13}{err:>+9.2%}")
    if errors:
        abs_err = [abs(e) for e in errors]
        print(f"\nmedian |error| {statistics.median(abs_err):.2%}, worst {max(abs_err):.2%} (targets 3% / 8%)")
    if args.no_probe:
        return 0
    print(f"\n{'workload':<14}{'predicted max':>15}{'probe max':>11}{'ratio':>8}{'trials':>8}{'OOMs':>6}")
    for name, (w, curve) in curves.items():
        pred = curve.max_micro_batch(device.usable_bytes)
        # the true max: everything the allocator can get, found by the probe from the prediction
        res = probe_workload(w, max(1, pred), device="cuda", tolerance=0.0, max_trials=24)
        ratio = pred / res.max_micro_batch if res.max_micro_batch else float("inf")
        print(f"{name:<14}{pred:>15}{res.max_micro_batch:>11}{ratio:>8.3f}{len(res.trials):>8}{res.oom_count:>6}")
        quick = probe_workload(w, max(1, pred), device="cuda")
        print(f"{'':<14} default probe from the prediction: {len(quick.trials)} trials, {quick.oom_count} OOM, "
              f"max {quick.max_micro_batch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
