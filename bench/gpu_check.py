"""One prepared check of batchpilot's predictions on a GPU: memory, the probe, step time, noise overhead, a plan.

    python bench/gpu_check.py --out runs/gpu-check            # on a CUDA machine; about 5-7 minutes on an H100
    python bench/gpu_check.py --dry-run --out /tmp/gpu-check  # tiny sizes on this CPU, < 1 minute: the code path

Writes ``gpu_check.json`` (every figure, the environment and the exact command) and ``gpu_check.md`` (the
tables, ready for docs/gpu-validation.md) to ``--out``, and prints the tables. Sections (``--sections``):

1. ``memory``: the traced peak (``trace_step``, CUDA target) against ``torch.cuda.max_memory_allocated`` over the
   same two real steps (state creation + steady state), for mnist1d-cnn, charlm, GPT-2 small (seq 512, 1024) and
   BERT-base (seq 128, 512) at three batches each, fp32 and bf16 autocast.
2. ``probe``: for GPT-2 small (seq 1024) and BERT-base (seq 512), fp32: the predicted largest micro-batch on this
   GPU; the OOM-safe probe started from it (trials, OOMs), as ``batchpilot memory --probe`` runs it; then the
   true largest micro-batch by bisection to the batch (``tolerance=0``).
3. ``step``: the median measured step (fresh AdamW, warm-up first) against the no-GPU prediction of
   :mod:`batchpilot.throughput.predict` for this GPU's name, for the same models, fp32 and bf16 autocast.
4. ``noise``: the micro-batch noise monitor's overhead on GPT-2 small (4 x 4 x 512 tokens): paired rounds of the
   plain accumulated step and the monitored one, same weights and batches.
5. ``plan``: ``batchpilot plan`` of a small ``hf:gpt2`` on stdlib text with ``--device cuda`` in a fresh process,
   its wall time and the measured throughput against the prediction. (The plan's LR check and noise probe train on
   the host CPU: batchpilot's trainer has no CUDA path yet.)
6. ``plan_gpt2``: ``batchpilot plan --workload hf:gpt2 --device <this GPU's name> --amp bf16``, the memory-only
   GPT-2 small (1024 tokens) that a machine without the GPU plans from predicted step times: here its throughput is
   measured on the GPU, against the bf16 prediction for the same batches, with its wall time.

The ``step`` section also calibrates the prediction (:func:`batchpilot.throughput.band.calibrate`): per precision,
the efficiency factor measured/predicted and the band left around it, which replaces the documented x1.5 band
of docs/gpu.md once it is committed to docs/gpu-validation.md.

The CPU-side predictions (fake-tensor traces) run in a pool of processes while the GPU measures. ``--budget-s``
(default 420) skips the sections that would not fit. In ``--dry-run`` everything runs on this CPU at tiny sizes:
memory against the CPU allocator's events (:mod:`batchpilot.memory.measure`), the probe against a *simulated*
out-of-memory error, step times against this CPU through the same cost model (measured peak and bandwidth).
Dry-run figures check the code, not a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

TARGETS = {"memory_median": 0.03, "memory_worst": 0.08, "max_batch_low": 0.9, "probe_trials": 3, "probe_ooms": 1,
           "step_time": 0.25, "noise_overhead": 0.01}
SECTIONS = ("memory", "probe", "step", "noise", "plan_gpt2", "plan")

# (workload, options, batches) per size; "amp" runs each in fp32 and bf16 autocast
GPU_MEMORY = [("mnist1d-cnn", {}, [256, 4096, 32768]), ("charlm", {}, [32, 256, 1024]),
              ("hf:gpt2", {"seq_len": 512}, [2, 8, 16]), ("hf:gpt2", {"seq_len": 1024}, [1, 4, 8]),
              ("hf:bert-base", {"seq_len": 128}, [8, 32, 128]), ("hf:bert-base", {"seq_len": 512}, [2, 8, 32])]
GPU_STEP = [("mnist1d-cnn", {}, [256, 4096]), ("charlm", {}, [32, 256]), ("hf:gpt2", {"seq_len": 512}, [4, 16]),
            ("hf:gpt2", {"seq_len": 1024}, [2, 8]), ("hf:bert-base", {"seq_len": 128}, [32, 128]),
            ("hf:bert-base", {"seq_len": 512}, [8, 32])]
GPU_PROBE = [("hf:gpt2", {"seq_len": 1024}), ("hf:bert-base", {"seq_len": 512})]
GPU_NOISE = ("hf:gpt2", {"seq_len": 512}, 16, 4)  # workload, options, global batch, accumulation
GPT2_PLAN = ["--workload", "hf:gpt2", "--amp", "bf16", "--no-report"]
"""``plan_gpt2``: the memory-only GPT-2 small; ``--device`` is this GPU's table name (measured here, predicted elsewhere)."""
DRY_GPT2_CONFIG = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64, "vocab_size": 128}
"""--dry-run: a tiny GPT-2 config file stands in for GPT-2 small (memory-only, planned for a predicted H100)."""
GPU_PLAN = ["--workload", "hf:gpt2", "--workload-opt", "data=stdlib", "--workload-opt", "n_layer=4",
            "--workload-opt", "n_embd=256", "--workload-opt", "n_head=4", "--workload-opt", "seq_len=256",
            "--device", "cuda"]

# --dry-run: the same code at tiny sizes on this CPU (each fake-tensor trace costs seconds, whatever the size)
DRY_MEMORY = [("mnist1d-cnn", {}, [8]), ("hf-tiny-gpt2", {"seq_len": 16}, [2, 8]), ("hf-tiny-bert", {"seq_len": 16}, [4])]
DRY_STEP = [("mnist1d-cnn", {}, [32, 256]), ("hf-tiny-gpt2", {"seq_len": 16}, [4, 16])]
DRY_PROBE = [("hf-tiny-gpt2", {"seq_len": 16})]
DRY_NOISE = ("hf-tiny-gpt2", {"seq_len": 16}, 16, 4)
DRY_PLAN = ["--workload", "hf-tiny-gpt2", "--workload-opt", "seq_len=16", "--device", "cpu", "--threads", "1",
            "--throughput-budget", "2", "--lr-check-budget", "2", "--probe-budget", "3", "--no-lr-check", "--no-report"]
DRY_PROBE_BATCH = 24
"""--dry-run: the pretend device holds the traced peak at this micro-batch."""


def _label(name: str, options: dict) -> str:
    return name + (f" s={options['seq_len']}" if "seq_len" in options else "")


def _workload(name: str, options: dict):
    from batchpilot.workloads import get_workload

    return get_workload(name, **options)


# ---------------------------------------------------------------- CPU-side predictions (pool workers)


def _worker_init() -> None:
    torch.set_num_threads(1)


def predict_peak(name: str, options: dict, batch: int, amp: bool, target: str) -> dict:
    """Traced peak of two steps at ``batch`` (fake tensors; nothing allocated)."""
    from batchpilot.memory.trace import trace_step

    t = trace_step(_workload(name, options), batch, amp=amp, target=target)
    return {"peak_bytes": t.peak_bytes, "peak_phase": t.peak_phase, "trace_s": t.seconds}


def predict_steps(name: str, options: dict, batches: list[int], amp: bool, device: str) -> dict:
    """Predicted step times at ``batches`` for GPU ``device`` (or this CPU, ``"cpu"``)."""
    from batchpilot.throughput import predict

    model = predict.cpu_model() if device == "cpu" else device
    stm = predict.step_time_model(_workload(name, options), model, amp=amp)
    return {"device": stm.device.describe(), "ops": stm.num_ops, "trace_s": stm.trace_seconds,
            "points": {str(b): asdict(stm.predict(b)) for b in batches}}


def predict_max_batch(name: str, options: dict, target: str, usable_bytes: int | None) -> dict:
    """The memory curve's largest micro-batch within ``usable_bytes`` (``None``: a pretend device that holds the
    traced peak at :data:`DRY_PROBE_BATCH`, from a three-trace curve)."""
    from batchpilot.memory import memory_curve

    dry = usable_bytes is None
    curve = memory_curve(_workload(name, options), device=target, batch_sizes=[1, 4, 16] if dry else None)
    usable = int(curve.peak_bytes(DRY_PROBE_BATCH)) if dry else usable_bytes
    return {"max_micro_batch": curve.max_micro_batch(usable), "usable_bytes": usable,
            "traced": {str(k): v for k, v in curve.peak_bytes_at.items()},
            "per_sample_bytes": curve.per_sample_bytes, "trace_s": curve.trace_seconds}


class Predictions:
    """Runs prediction tasks in a process pool (or in this process with ``workers <= 1``)."""

    def __init__(self, workers: int) -> None:
        self.pool = None
        if workers > 1:
            import multiprocessing

            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init)

    def submit(self, fn: Callable, *args: Any) -> Future:
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            fut.set_exception(exc)
        return fut

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _result(fut: Future) -> tuple[Any, str | None]:
    try:
        return fut.result(), None
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"


# ---------------------------------------------------------------- real measurements


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _batch(workload, batch: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    n = workload.num_train
    idx = torch.arange(batch) % n
    x, y = workload.train_data[idx] if hasattr(workload.train_data, "tensors") else \
        tuple(torch.stack(t) for t in zip(*[workload.train_data[int(i)] for i in idx]))
    return x.to(dev), y.to(dev)


def _build(workload, dev: torch.device):
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(0)
        model = workload.make_model().to(dev)
    model.train()
    return model


def _step(workload, model, optimizer, x, y, amp: bool, dev: torch.device) -> None:
    units = max(1, workload.count_units(y))
    ctx = torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if amp else torch.autocast(dev.type, enabled=False)
    with ctx:
        loss = workload.loss_sum(model(x), y) / units
    loss.backward()
    del loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measured_peak(workload, batch: int, amp: bool, dev: torch.device, model=None) -> int:
    """Peak bytes of two real steps with a fresh optimizer: ``max_memory_allocated`` above what was allocated before the
    model (CUDA), or the CPU allocator's events (:func:`batchpilot.memory.measure.measure_step`)."""
    if dev.type == "cpu":
        from batchpilot.memory.measure import measure_step

        return measure_step(workload, batch, amp=amp).peak_bytes
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    optimizer = workload.make_optimizer(model.parameters(), workload.base_lr)
    x, y = _batch(workload, batch, dev)
    for _ in range(2):
        _step(workload, model, optimizer, x, y, amp, dev)
    _sync(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    del optimizer, x, y
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return int(peak)


def measured_step_s(workload, model, batch: int, amp: bool, dev: torch.device, *, warmup: int = 3, steps: int = 10,
                    max_s: float = 20.0) -> dict:
    """Median seconds of full steps (batch to device, forward, backward, AdamW, zero_grad), after a warm-up."""
    optimizer = workload.make_optimizer(model.parameters(), workload.base_lr)
    x, y = _batch(workload, batch, dev)
    for _ in range(warmup):
        _step(workload, model, optimizer, x, y, amp, dev)
    times = []
    start = time.perf_counter()
    while len(times) < steps and (time.perf_counter() - start < max_s or len(times) < 3):
        _sync(dev)
        t0 = time.perf_counter()
        _step(workload, model, optimizer, x, y, amp, dev)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    del optimizer
    model.zero_grad(set_to_none=True)
    return {"median_s": statistics.median(times), "steps": len(times),
            "spread": (max(times) - min(times)) / statistics.median(times)}


# ---------------------------------------------------------------- sections


def submit_memory(cases, amps, preds: Predictions, target: str) -> dict:
    return {(name, json.dumps(options), amp, b): preds.submit(predict_peak, name, options, b, amp, target)
            for name, options, batches in cases for amp in amps for b in batches}


def section_memory(cases, amps, dev, futures: dict) -> list[dict]:
    rows = []
    for name, options, batches in cases:
        workload = _workload(name, options)
        model = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(dev)
            model = _build(workload, dev)
        for amp in amps:
            for b in batches:
                row = {"workload": _label(name, options), "precision": "bf16 autocast" if amp else "fp32", "batch": b}
                try:
                    real = measured_peak(workload, b, amp, dev, model)
                    if dev.type == "cuda":
                        real -= base
                    row["measured_bytes"] = real
                except Exception as exc:  # noqa: BLE001 - an OOM or a failure is a row, not a crash
                    row["error"] = f"measure: {type(exc).__name__}: {str(exc)[:160]}"
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                pred, err = _result(futures[(name, json.dumps(options), amp, b)])
                if pred is not None:
                    row["predicted_bytes"] = pred["peak_bytes"]
                    row["peak_phase"] = pred["peak_phase"]
                else:
                    row["error"] = (row.get("error", "") + f" predict: {err}").strip()
                if "measured_bytes" in row and "predicted_bytes" in row:
                    row["error_frac"] = row["predicted_bytes"] / row["measured_bytes"] - 1
                rows.append(row)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def submit_step(cases, amps, preds: Predictions, device_name: str) -> dict:
    return {(name, json.dumps(o), amp): preds.submit(predict_steps, name, o, bs, amp, device_name)
            for name, o, bs in cases for amp in amps}


def section_step(cases, amps, dev, futures: dict) -> list[dict]:
    rows = []
    for name, options, batches in cases:
        workload = _workload(name, options)
        model = _build(workload, dev)
        for amp in amps:
            pred, err = _result(futures[(name, json.dumps(options), amp)])
            for b in batches:
                row = {"workload": _label(name, options), "precision": "bf16 autocast" if amp else "fp32", "batch": b}
                try:
                    row.update({f"measured_{k}": v for k, v in measured_step_s(workload, model, b, amp, dev).items()})
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"measure: {type(exc).__name__}: {str(exc)[:160]}"
                if pred is not None:
                    p = pred["points"][str(b)]
                    row.update({"predicted_s": p["step_s"], "bound": p["bound"], "flops": p["flops"],
                                "model": pred["device"]})
                    if "measured_median_s" in row:
                        row["error_frac"] = p["step_s"] / row["measured_median_s"] - 1
                        row["achieved_flops_per_s"] = p["flops"] / row["measured_median_s"]  # forward + backward
                else:
                    row["error"] = (row.get("error", "") + f" predict: {err}").strip()
                rows.append(row)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def submit_probe(cases, preds: Predictions, target: str, dry_run: bool) -> dict:
    from batchpilot.memory import resolve_device

    usable = None if dry_run else resolve_device("cuda").usable_bytes
    return {name: preds.submit(predict_max_batch, name, o, target, usable) for name, o in cases}


def section_probe(cases, dev, futures: dict, dry_run: bool) -> list[dict]:
    from batchpilot.memory import probe_workload

    rows = []
    for name, options in cases:
        workload = _workload(name, options)
        row: dict[str, Any] = {"workload": _label(name, options), "precision": "fp32"}
        pred, err = _result(futures[name])
        if pred is None:
            rows.append({**row, "error": f"predict: {err}"})
            continue
        predicted = pred["max_micro_batch"]
        row.update({"usable_bytes": pred["usable_bytes"], "predicted_max": predicted})
        hook = None
        if dry_run:  # a simulated device that fits 7% more than predicted: any module fed a larger batch "runs out"
            limit = int(predicted * 1.07) + 1
            row["simulated_true_max"] = limit

            def oom(module, inputs):
                x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
                if x is not None and x.dim() >= 2 and x.shape[0] > limit:
                    raise RuntimeError("CUDA out of memory (simulated for --dry-run)")

            hook = torch.nn.modules.module.register_module_forward_pre_hook(oom)
        try:
            t0 = time.perf_counter()
            res = probe_workload(workload, predicted, device=dev.type)
            row.update({"probe_max": res.max_micro_batch, "probe_first_failing": res.first_failing,
                        "probe_trials": len(res.trials), "probe_ooms": res.oom_count,
                        "probe_s": time.perf_counter() - t0})
            exact = probe_workload(workload, max(1, res.max_micro_batch), device=dev.type, tolerance=0.0, max_trials=12)
            row.update({"true_max": exact.max_micro_batch, "true_first_failing": exact.first_failing,
                        "bisect_trials": len(exact.trials)})
            if exact.max_micro_batch:
                row["predicted_over_true"] = predicted / exact.max_micro_batch
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"probe: {type(exc).__name__}: {str(exc)[:160]}"
        finally:
            if hook is not None:
                hook.remove()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def section_noise(case, dev, rounds: int) -> dict:
    """Paired rounds: the plain accumulated step and the monitored one (GradientNoiseScale), same weights and data."""
    from batchpilot.noise.microbatch import GradientNoiseScale
    from batchpilot.train import accumulate_gradients

    name, options, batch, accumulation = case
    workload = _workload(name, options)
    micro = batch // accumulation
    models = [_build(workload, dev) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [workload.make_optimizer(m.parameters(), workload.base_lr) for m in models]
    monitor = GradientNoiseScale(models[1])
    g = torch.Generator().manual_seed(0)
    times: list[list[float]] = [[], []]
    warmup = 3
    for r in range(warmup + rounds):
        idx = torch.randint(0, workload.num_train, (batch,), generator=g)
        x, y = workload.train_data[idx] if hasattr(workload.train_data, "tensors") else _batch(workload, batch, dev)
        parts = [(x[i:i + micro].to(dev), y[i:i + micro].to(dev)) for i in range(0, batch, micro)]
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for k in order:
            _sync(dev)
            t0 = time.perf_counter()
            accumulate_gradients(models[k], parts, workload.loss_sum, workload.count_units,
                                 after_micro=monitor.after_micro if k == 1 else None)
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            _sync(dev)
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    plain, mon = statistics.median(times[0]), statistics.median(times[1])
    paired = statistics.median(b / a for a, b in zip(*times)) - 1
    est = monitor.estimate()
    del models, opts
    return {"workload": _label(name, options), "batch": batch, "accumulation": accumulation, "rounds": rounds,
            "plain_median_s": plain, "monitored_median_s": mon, "overhead_ratio_of_medians": mon / plain - 1,
            "overhead_median_paired": paired, "b_simple": est.b_simple}


def calibration(rows: list[dict], device_name: str) -> list[dict]:
    """Per precision, the step-time efficiency factor (measured / predicted) and the band left around it."""
    from batchpilot.throughput.band import calibrate

    out = []
    for precision in sorted({r["precision"] for r in rows}):
        pairs = [(r["measured_median_s"], r["predicted_s"]) for r in rows
                 if r["precision"] == precision and "predicted_s" in r and "measured_median_s" in r]
        try:
            cal = calibrate([m for m, _ in pairs], [p for _, p in pairs], device_name)
            out.append({"precision": precision, **cal.to_dict()})
        except Exception as exc:  # noqa: BLE001 - too few rows: say so
            out.append({"precision": precision, "error": f"{type(exc).__name__}: {exc}"})
    return out


def gpt2_plan_args(out: Path, device_name: str, dry_run: bool) -> list[str]:
    """``plan_gpt2``'s arguments: GPT-2 small for this GPU's table name, or a tiny config for a predicted H100."""
    if dry_run:
        config = out / "tiny-gpt2-config.json"
        config.write_text(json.dumps(DRY_GPT2_CONFIG))
        return ["--workload", f"hf:{config}", "--workload-opt", "seq_len=16", "--device", "H100", "--amp", "bf16",
                "--threads", "1", "--no-report"]
    from batchpilot.throughput.predict import _table_key

    return [*GPT2_PLAN, "--device", _table_key(device_name) or "cuda"]


def section_plan(args_list: list[str], out: Path, timeout_s: float, device_name: str, *, in_process: bool = False,
                 subdir: str = "plan") -> dict:
    """``batchpilot plan`` in a fresh process, with its wall time; its measured throughput against the prediction."""
    plan_dir = out / subdir
    cmd = [sys.executable, "-m", "batchpilot", "plan", *args_list, "--json", "--out", str(plan_dir)]
    t0 = time.perf_counter()
    if in_process:  # --dry-run: no second interpreter to start (transformers alone takes seconds to import)
        import contextlib
        import io

        from batchpilot.cli import main as cli_main

        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli_main(cmd[3:])
        proc = subprocess.CompletedProcess(cmd, code, stdout.getvalue(), stderr.getvalue())
    else:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"command": " ".join(cmd[2:]), "error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {"command": " ".join(cmd[2:]), "wall_s": wall, "exit_code": proc.returncode,
                           "in_process": in_process, "amp": "--amp" in args_list}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "no output"
        return row
    plan = json.loads(proc.stdout)
    th = plan["throughput"]
    row.update({"global_batch": plan["global_batch"], "micro_batch": plan["micro_batch_per_rank"],
                "accumulation": plan["accumulation_steps"], "lr": plan["lr"], "samples_per_s": plan["samples_per_s"],
                "max_micro_batch": plan["max_micro_batch"], "throughput_device": th["device"],
                "timings_s": plan["timings_s"], "caveats": plan["caveats"], "memory_only": plan.get("memory_only"),
                "tokens_per_sample": plan.get("tokens_per_sample"), "goodput_band": plan.get("goodput_band"),
                "goodput_band_source": plan.get("goodput_band_source"), "noise_method": plan["noise"].get("method")})
    if str(th.get("peak_source", "")).startswith("predicted"):  # --dry-run without the GPU: nothing measured to compare
        row["throughput_predicted"] = True
        return row
    try:  # the plan's measured points against the prediction for this device
        from batchpilot.cli.common import workload_options

        opts = workload_options(argparse.Namespace(workload_opt=[a for i, a in enumerate(args_list)
                                                                 if i and args_list[i - 1] == "--workload-opt"]))
        name = args_list[args_list.index("--workload") + 1]
        if "--workload-opt" not in args_list and name.startswith("hf:"):
            opts = {"seq_len": 1024}  # the memory-only default, as the plan traced it
        pred = predict_steps(name, opts, [p["batch"] for p in th["points"]], "--amp" in args_list, device_name)
        row["points"] = [{"batch": p["batch"], "measured_s": p["step_s"], "mfu": p["mfu"],
                          "predicted_s": pred["points"][str(p["batch"])]["step_s"],
                          "error_frac": pred["points"][str(p["batch"])]["step_s"] / p["step_s"] - 1} for p in th["points"]]
    except Exception as exc:  # noqa: BLE001
        row["points_error"] = f"{type(exc).__name__}: {exc}"
    return row


# ---------------------------------------------------------------- summary and output


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}%"


def summarize(result: dict) -> dict:
    """The headline figures and each target met or not (``None`` when not measured)."""
    s: dict[str, Any] = {}
    mem = [abs(r["error_frac"]) for r in result.get("memory", []) if "error_frac" in r]
    if mem:
        s["memory_median_abs_error"] = statistics.median(mem)
        s["memory_worst_abs_error"] = max(mem)
        s["memory_target_met"] = s["memory_median_abs_error"] <= TARGETS["memory_median"] and \
            s["memory_worst_abs_error"] <= TARGETS["memory_worst"]
    probes = [r for r in result.get("probe", []) if "true_max" in r]
    if probes:
        s["max_batch_target_met"] = all(TARGETS["max_batch_low"] <= r["predicted_max"] / r["true_max"] <= 1
                                        for r in probes if r["true_max"])
        s["probe_target_met"] = all(r["probe_trials"] <= TARGETS["probe_trials"] and r["probe_ooms"] <= TARGETS["probe_ooms"]
                                    for r in probes)
    steps = [abs(r["error_frac"]) for r in result.get("step", []) if "error_frac" in r]
    if steps:
        s["step_median_abs_error"] = statistics.median(steps)
        s["step_worst_abs_error"] = max(steps)
        s["step_within_25pct"] = sum(e <= TARGETS["step_time"] for e in steps)
        s["step_rows"] = len(steps)
        s["step_target_met"] = all(e <= TARGETS["step_time"] for e in steps)
    for cal in result.get("calibration") or []:
        if "factor" in cal:
            s[f"step_factor_{cal['precision'].split()[0]}"] = cal["factor"]
    noise = result.get("noise") or {}
    if "overhead_median_paired" in noise:
        s["noise_overhead"] = noise["overhead_median_paired"]
        s["noise_target_met"] = noise["overhead_median_paired"] <= TARGETS["noise_overhead"]
    plan = result.get("plan") or {}
    if "wall_s" in plan:
        s["plan_wall_s"] = plan["wall_s"]
        s["plan_ok"] = plan.get("exit_code") == 0
    return s


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# batchpilot GPU check: {env['device']}" + (" (DRY RUN on CPU: checks the code, not a GPU)"
                                                           if result["dry_run"] else ""),
             "", f"{env['date']}, torch {env['torch']}, CUDA {env['cuda']}, command `{result['command']}`, "
                 f"{result['wall_s']:.0f} s.", ""]
    s = result["summary"]
    lines += ["## Summary", "", "| figure | value | target | met |", "|---|---|---|---|"]

    def add(name, value, target, met):
        lines.append(f"| {name} | {value} | {target} | {'-' if met is None else 'yes' if met else 'NO'} |")

    if "memory_median_abs_error" in s:
        add("peak memory, median / worst abs error", f"{100 * s['memory_median_abs_error']:.1f}% / "
            f"{100 * s['memory_worst_abs_error']:.1f}%", "<= 3% / <= 8%", s["memory_target_met"])
    if "max_batch_target_met" in s:
        add("predicted max batch / true", ", ".join(f"{r['workload']}: {r['predicted_max']}/{r.get('true_max')}"
                                                    for r in result["probe"]), "0.9-1.0", s["max_batch_target_met"])
        add("probe trials / OOMs", ", ".join(f"{r['workload']}: {r.get('probe_trials')}/{r.get('probe_ooms')}"
                                             for r in result["probe"]), "<= 3 / <= 1", s["probe_target_met"])
    if "step_median_abs_error" in s:
        add("step time predicted vs measured, median / worst", f"{100 * s['step_median_abs_error']:.0f}% / "
            f"{100 * s['step_worst_abs_error']:.0f}% ({s['step_within_25pct']}/{s['step_rows']} within 25%)",
            "within 25%", s["step_target_met"])
    if "noise_overhead" in s:
        add("noise-monitor overhead (median paired)", _pct(s["noise_overhead"]), "<= 1%", s["noise_target_met"])
    if "plan_wall_s" in s:
        add("batchpilot plan wall time", f"{s['plan_wall_s']:.0f} s", "-", s["plan_ok"])
    for key, title in (("memory", "Peak memory: traced vs measured"), ("step", "Step time: predicted vs measured"),
                       ("probe", "Largest micro-batch: predicted, probed, true")):
        rows = result.get(key) or []
        if not rows:
            continue
        lines += ["", f"## {title}", ""]
        if key == "memory":
            lines += ["| workload | precision | batch | predicted | measured | error | peak phase |", "|---|---|---:|---:|---:|---:|---|"]
            lines += [f"| {r['workload']} | {r['precision']} | {r['batch']} | {_mib(r.get('predicted_bytes'))} | "
                      f"{_mib(r.get('measured_bytes'))} | {_pct(r.get('error_frac'))} | "
                      f"{r.get('peak_phase', r.get('error', ''))} |" for r in rows]
        elif key == "step":
            lines += ["| workload | precision | batch | predicted | measured | error | bound |", "|---|---|---:|---:|---:|---:|---|"]
            lines += [f"| {r['workload']} | {r['precision']} | {r['batch']} | "
                      f"{r['predicted_s'] * 1e3 if 'predicted_s' in r else float('nan'):.2f} ms | "
                      f"{r['measured_median_s'] * 1e3 if 'measured_median_s' in r else float('nan'):.2f} ms | "
                      f"{_pct(r.get('error_frac'))} | {r.get('bound', r.get('error', ''))} |" for r in rows]
        else:
            lines += ["| workload | usable | predicted | probe: max / first OOM | trials / OOMs | true max | predicted/true |",
                      "|---|---:|---:|---|---|---:|---:|"]
            lines += [f"| {r['workload']} | {_mib(r.get('usable_bytes'))} | {r.get('predicted_max', '-')} | "
                      f"{r.get('probe_max', '-')} / {r.get('probe_first_failing', '-')} | {r.get('probe_trials', '-')} / "
                      f"{r.get('probe_ooms', '-')} | {r.get('true_max', r.get('error', '-'))} | "
                      f"{r.get('predicted_over_true', float('nan')):.3f} |" for r in rows]
    noise = result.get("noise")
    if noise:
        lines += ["", "## Noise monitor", ""]
        if "error" in noise:
            lines.append(f"error: {noise['error']}")
        else:
            lines.append(f"{noise['workload']}, {noise['accumulation']} x {noise['batch'] // noise['accumulation']}, "
                         f"{noise['rounds']} paired rounds: plain {noise['plain_median_s'] * 1e3:.2f} ms, monitored "
                         f"{noise['monitored_median_s'] * 1e3:.2f} ms; overhead {_pct(noise['overhead_median_paired'])} "
                         f"(median paired), {_pct(noise['overhead_ratio_of_medians'])} (ratio of medians).")
    plan = result.get("plan")
    if plan:
        lines += ["", "## batchpilot plan", "", f"`{plan.get('command', '')}`", ""]
        if "error" in plan:
            lines.append(f"error: {plan['error']}")
        else:
            lines.append(f"{plan['wall_s']:.0f} s; global batch {plan['global_batch']} = {plan['micro_batch']} x "
                         f"{plan['accumulation']}, LR {plan['lr']:.3g}, {plan['samples_per_s']:.0f} samples/s on "
                         f"{plan['throughput_device']}; stage times "
                         + ", ".join(f"{k} {v:.0f} s" for k, v in plan["timings_s"].items()) + ".")
            for p in plan.get("points", []):
                lines.append(f"- batch {p['batch']}: measured {p['measured_s'] * 1e3:.2f} ms, predicted "
                             f"{p['predicted_s'] * 1e3:.2f} ms ({_pct(p['error_frac'])})")
    cals = [c for c in result.get("calibration") or [] if "factor" in c]
    if cals:
        lines += ["", "## Step-time calibration (measured / predicted)", ""]
        for c in cals:
            lines.append(f"- {c['precision']}: factor x{c['factor']:.3g}; band after it x{c['band']['low_factor']:.3g}"
                         f"-x{c['band']['high_factor']:.3g}, {c['band']['relative']:.0%} between batches")
    g = result.get("plan_gpt2")
    if g:
        lines += ["", "## batchpilot plan of GPT-2 small (memory-only, bf16)", "", f"`{g.get('command', '')}`", ""]
        if "error" in g:
            lines.append(f"error: {g['error']}")
        else:
            tps = g.get("tokens_per_sample") or 1
            lines.append(f"{g['wall_s']:.0f} s; global batch {g['global_batch']} = {g['micro_batch']} x "
                         f"{g['accumulation']}, {g['samples_per_s']:.1f} samples/s ({g['samples_per_s'] * tps:,.0f} "
                         f"tokens/s) on {g['throughput_device']}; noise scale {g.get('noise_method')}.")
            for p in g.get("points", []):
                lines.append(f"- batch {p['batch']}: measured {p['measured_s'] * 1e3:.2f} ms, predicted "
                             f"{p['predicted_s'] * 1e3:.2f} ms ({_pct(p['error_frac'])})")
    skipped = result.get("skipped") or []
    if skipped:
        lines += ["", "Skipped (time budget): " + ", ".join(skipped)]
    return "\n".join(lines) + "\n"


def environment(dev: torch.device) -> dict:
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "python": platform.python_version(), "host_cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on this CPU (checks the code path, not a GPU)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would start after this (default 420)")
    ap.add_argument("--workers", type=int, default=None, help="prediction processes (default: min(8, CPUs - 2); 1 in --dry-run)")
    ap.add_argument("--no-amp", action="store_true", help="fp32 only (skip the bf16 autocast rows)")
    args = ap.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; expected {', '.join(SECTIONS)}")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; run with --dry-run to check the code path on this CPU",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        torch.set_num_threads(1)
    workers = args.workers if args.workers is not None else (1 if args.dry_run else max(1, min(8, (os.cpu_count() or 2) - 2)))
    target = "cpu" if args.dry_run else "cuda"
    device_name = "cpu" if args.dry_run else torch.cuda.get_device_name(dev)
    amps = (False,) if args.no_amp else (False, True)
    start = time.perf_counter()
    result: dict[str, Any] = {"dry_run": args.dry_run, "command": " ".join(["python", "bench/gpu_check.py", *(argv if argv
                              is not None else sys.argv[1:])]), "environment": environment(dev), "targets": TARGETS,
                              "skipped": []}
    # expected share of the budget per section on an H100, to skip what cannot finish
    need = {"memory": 0.0, "step": 60.0, "probe": 60.0, "noise": 20.0, "plan": 150.0, "plan_gpt2": 90.0}
    preds = Predictions(workers)
    mem_cases, step_cases = (DRY_MEMORY, DRY_STEP) if args.dry_run else (GPU_MEMORY, GPU_STEP)
    probe_cases = DRY_PROBE if args.dry_run else GPU_PROBE
    try:  # every CPU-side prediction first, so the pool traces while the device measures
        futures: dict[str, Any] = {}
        if "memory" in sections:
            futures["memory"] = submit_memory(mem_cases, amps, preds, target)
        if "step" in sections:
            futures["step"] = submit_step(step_cases, amps, preds, device_name)
        if "probe" in sections:
            futures["probe"] = submit_probe(probe_cases, preds, target, args.dry_run)
        for name in [s for s in SECTIONS if s in sections]:
            elapsed = time.perf_counter() - start
            if elapsed + need[name] > args.budget_s:
                result["skipped"].append(name)
                continue
            print(f"[{elapsed:5.0f} s] {name} ...", file=sys.stderr, flush=True)
            try:
                if name == "memory":
                    result["memory"] = section_memory(mem_cases, amps, dev, futures["memory"])
                elif name == "step":
                    result["step"] = section_step(step_cases, amps, dev, futures["step"])
                    result["calibration"] = calibration(result["step"], device_name)
                elif name == "probe":
                    result["probe"] = section_probe(probe_cases, dev, futures["probe"], args.dry_run)
                elif name == "noise":
                    result["noise"] = section_noise(DRY_NOISE if args.dry_run else GPU_NOISE, dev,
                                                    rounds=6 if args.dry_run else 20)
                elif name == "plan":
                    left = max(60.0, args.budget_s - (time.perf_counter() - start) + 60)
                    result["plan"] = section_plan(DRY_PLAN if args.dry_run else GPU_PLAN, out, left, device_name,
                                                  in_process=args.dry_run)
                elif name == "plan_gpt2":
                    left = max(60.0, args.budget_s - (time.perf_counter() - start) + 60)
                    result["plan_gpt2"] = section_plan(gpt2_plan_args(out, device_name, args.dry_run), out, left,
                                                       device_name, in_process=args.dry_run, subdir="plan_gpt2")
            except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others
                result[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            result.setdefault("section_s", {})[name] = time.perf_counter() - start - elapsed
            (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))  # partial results survive
    finally:
        preds.close()
    result["wall_s"] = time.perf_counter() - start
    result["summary"] = summarize(result)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    (out / "gpu_check.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
