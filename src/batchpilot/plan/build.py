"""``make_plan``: memory -> throughput -> noise -> goodput search -> the plan.

Each stage is measured on fresh objects under a forked RNG; nothing of the caller's changes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Callable, Sequence

import torch
from torch import nn

from batchpilot.errors import BatchpilotError
from batchpilot.plan import goodput as gp
from batchpilot.plan import worlds as wd
from batchpilot.plan.probe import NoiseProbe, probe_micro_batch, probe_noise
from batchpilot.plan.result import Plan
from batchpilot.plan.worlds import CommModel
from batchpilot.plan.text import caveats_for, lr_rule_note, noise_note, why_text
from batchpilot.scaling.lr_rules import LR_RULES, default_lr_rule
from batchpilot.throughput.measure import ThroughputCurve, choose_cpu_threads, default_batches, measure_throughput
from batchpilot.workloads import Workload

Progress = Callable[[str, float], None]
STAGES = (("memory", 0.1), ("throughput", 0.3), ("noise", 0.55), ("plan", 0.05))
_STAGE_START = {name: sum(w for _, w in STAGES[:i]) for i, (name, _) in enumerate(STAGES)}


def _staged(progress: Progress | None, stage: str) -> Progress | None:
    if progress is None:
        return None
    start = _STAGE_START[stage]
    width = dict(STAGES)[stage]
    return lambda desc, frac: progress(desc, start + width * max(0.0, min(1.0, frac)))


def has_batchnorm(workload: Workload) -> bool:
    """Whether the workload's model has BatchNorm layers (built under a forked RNG)."""
    with torch.random.fork_rng(devices=[]):
        model = workload.make_model()
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def make_plan(
    workload: Workload,
    *,
    device: str | None = None,
    memory: str | int | None = None,
    world_size: int = 1,
    lr_rule: str | None = None,
    threads: int | None = None,
    throughput_budget_s: float = 25.0,
    noise_budget_s: float = 50.0,
    seed: int = 0,
    progress: Progress | None = None,
    probe: NoiseProbe | None = None,
    throughput: ThroughputCurve | None = None,
    world_sizes: Sequence[int] | None = None,
    allreduce_gbps: float | None = None,
    comm: CommModel | None = None,
) -> Plan:
    """Measure the workload and choose the goodput-optimal configuration.

    Args:
        workload: what to plan for.
        device: ``cpu`` (default), ``cuda`` or a GPU name (memory model; throughput is measured on
            the GPU only when it is the one present, else on this CPU, with a caveat).
        memory: device memory size overriding the device's (``"24GiB"``).
        world_size: data-parallel ranks (throughput scales per rank; communication is not measured).
        lr_rule: ``linear``/``sqrt``/``none`` (default: by optimizer, :func:`default_lr_rule`).
        threads: torch CPU threads for the measurements; ``None`` measures 1 against the current count
            and keeps the faster (the plan records it). The caller's setting is restored afterwards.
        throughput_budget_s, noise_budget_s: time budgets of the two measurements.
        seed: seeds the measurement runs.
        progress: ``progress(description, fraction)``.
        probe, throughput: reuse earlier measurements instead of measuring again.
        world_sizes: plan at each of these world sizes and recommend one (:mod:`.worlds`); the plan's
            ``world_size`` is then the recommended one and ``worlds`` holds the table.
        allreduce_gbps: all-reduce bus bandwidth for world sizes > 1 (default: measured with gloo here).
        comm: a ready all-reduce model (overrides ``allreduce_gbps``).
    """

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise BatchpilotError(f"world size must be a positive integer, got {world_size!r}")
    if lr_rule is not None and lr_rule not in LR_RULES:
        raise BatchpilotError(f"lr rule must be one of {', '.join(LR_RULES)}, got {lr_rule!r}")
    before = torch.get_num_threads()
    try:
        return _make_plan(workload, device=device, memory=memory, world_size=world_size, lr_rule=lr_rule,
                          threads=threads, throughput_budget_s=throughput_budget_s, noise_budget_s=noise_budget_s,
                          seed=seed, progress=progress, probe=probe, throughput=throughput,
                          world_sizes=tuple(world_sizes) if world_sizes else None, allreduce_gbps=allreduce_gbps,
                          comm=comm)
    finally:
        torch.set_num_threads(before)


def _make_plan(workload, *, device, memory, world_size, lr_rule, threads, throughput_budget_s, noise_budget_s, seed,
               progress, probe, throughput, world_sizes=None, allreduce_gbps=None, comm=None) -> Plan:
    from batchpilot.memory import memory_curve, resolve_device

    if world_sizes:
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in world_sizes):
            raise BatchpilotError(f"world sizes must be positive integers, got {list(world_sizes)}")
        world_sizes = tuple(sorted(set(world_sizes)))
        world_size = world_sizes[0]  # the measurements' batch cap

    timings: dict[str, float] = {}
    spec = resolve_device(device, memory)
    on_gpu = spec.kind == "cuda" and torch.cuda.is_available()
    measure_device = "cuda" if on_gpu else "cpu"

    t0 = time.perf_counter()
    step = _staged(progress, "memory")
    if step:
        step(f"memory: tracing {workload.name}", 0.0)
    curve = memory_curve(workload, device="cuda" if spec.kind == "cuda" else "cpu")
    curve.check_budget(spec.usable_bytes, f"the usable memory of {spec.name}")
    max_micro = curve.max_micro_batch(spec.usable_bytes)
    timings["memory"] = time.perf_counter() - t0

    per_rank_cap = workload.num_train // world_size
    if per_rank_cap < 1:
        raise BatchpilotError(f"world size {world_size} exceeds the training set ({workload.num_train} samples)")
    max_batch = min(max_micro, per_rank_cap)
    t0 = time.perf_counter()
    thread_scores: dict[int, float] = {}
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise BatchpilotError(f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
    elif measure_device == "cpu" and throughput is None and torch.get_num_threads() > 1:
        if progress:
            progress("throughput: choosing CPU threads", _STAGE_START["throughput"])
        probe_batches = sorted({min(workload.base_batch, max_batch), min(4 * workload.base_batch, max_batch)})
        best, thread_scores = choose_cpu_threads(workload, probe_batches, seed=seed)
        torch.set_num_threads(best)
    if throughput is None:
        batches = set(default_batches(workload.base_batch, max_batch))
        batches |= {b for b in (workload.base_batch, probe_micro_batch(workload.base_batch)) if b <= max_batch}
        throughput = measure_throughput(workload, batch_sizes=sorted(batches), device=measure_device,
                                        time_budget_s=max(5.0, throughput_budget_s - (time.perf_counter() - t0)),
                                        seed=seed,
                                        progress=_staged(progress, "throughput"))
    timings["throughput"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if probe is None:
        probe = probe_noise(workload, time_budget_s=noise_budget_s, seed=seed, progress=_staged(progress, "noise"))
    timings["noise"] = time.perf_counter() - t0

    step = _staged(progress, "plan")
    if step:
        step("plan: goodput search", 0.0)
    rule = lr_rule or default_lr_rule(workload.optimizer_family())
    b_noise = probe.b_noise_effective
    if not b_noise > 0:  # nan: no usable estimate; plan for efficiency 1 nowhere: stay at the base batch
        b_noise_used = float(workload.base_batch)
    else:
        b_noise_used = b_noise
    anchor = (probe.batch, float(probe.samples_to_target)) if probe.samples_to_target else None
    common = dict(throughput=throughput, memory=curve, base_batch=workload.base_batch, base_lr=workload.base_lr,
                  lr_rule=rule, anchor=anchor, steps_per_epoch_base=math.ceil(workload.num_train / workload.base_batch))
    micro_choices = [b for b in throughput.batches if b <= max_micro]
    worlds_info: dict = {}
    if max(world_sizes or (world_size,)) > 1:  # the all-reduce term (plan/worlds.py)
        comm = comm or wd.comm_model(workload, allreduce_gbps=allreduce_gbps)
        with_comm = lambda w: wd.StepTimeWithComm(throughput, comm.allreduce_s(w))  # noqa: E731
        if world_sizes:
            def best_at(w: int) -> gp.Candidate:
                return gp.choose(gp.search(micro_choices=micro_choices, world_size=w, max_micro_batch=max_micro,
                                           max_global_batch=workload.num_train, b_noise=b_noise_used,
                                           **{**common, "throughput": with_comm(w)}))
            rows, world_size = wd.compare_world_sizes(world_sizes, best_at, comm)
            worlds_info = {"world_sizes": list(world_sizes), "recommended": world_size,
                           "recommend_margin": wd.RECOMMEND_MARGIN, "table": [asdict(r) for r in rows]}
            max_batch = min(max_micro, workload.num_train // world_size)
        common["throughput"] = with_comm(world_size)
        worlds_info["comm"] = comm.to_dict()
    candidates = gp.search(micro_choices=micro_choices, world_size=world_size, max_micro_batch=max_micro,
                           max_global_batch=workload.num_train, b_noise=b_noise_used, **common)
    chosen = gp.choose(candidates)
    largest = gp.evaluate(max_batch, 1, world_size=world_size, b_noise=b_noise_used, **common)
    base = next((c for c in candidates if c.global_batch == workload.base_batch), None)
    alternatives = {"largest_that_fits": largest.to_dict()}
    if base is not None:
        alternatives["base_batch"] = base.to_dict()
    for name, value in (("noise_low", probe.b_noise_low), ("noise_high", probe.b_noise_high)):
        if value > 0:
            alt = gp.choose(gp.search(micro_choices=micro_choices, world_size=world_size, max_micro_batch=max_micro,
                                      max_global_batch=workload.num_train, b_noise=value, **common))
            alternatives[f"best_if_{name}"] = alt.to_dict()
    if worlds_info:
        listed = world_sizes or (world_size,)
        sizes = sorted(set(listed) | {1 << i for i in range(max(listed).bit_length())})  # and the powers of two
        worlds_info["elastic"] = wd.elastic_splits(chosen.global_batch, sizes, max_micro_batch=max_micro,
                                                   step_model=with_comm)
        worlds_info["compatible_world_sizes"] = wd.compatible_world_sizes(chosen.global_batch)
    bn = has_batchnorm(workload)
    caveats = caveats_for(workload=workload, chosen=chosen, probe=probe, throughput=throughput, curve=curve,
                          batchnorm=bn, measured_on=measure_device, spec=spec, candidates=candidates,
                          world_size=world_size, b_noise_used=b_noise_used,
                          comm_note=worlds_info["comm"]["source"] if "comm" in worlds_info else None)
    timings["plan"] = sum(timings.values())
    return Plan(
        workload=workload.name, micro_batch_per_rank=chosen.micro_batch_per_rank,
        accumulation_steps=chosen.accumulation_steps, world_size=world_size, global_batch=chosen.global_batch,
        lr=chosen.lr, lr_rule=rule, warmup_steps=chosen.warmup_steps, schedule="constant",
        noise_scale=b_noise, noise_scale_low=probe.b_noise_low, noise_scale_high=probe.b_noise_high,
        samples_per_s=chosen.samples_per_s, efficiency=chosen.efficiency, goodput=chosen.goodput,
        peak_bytes=chosen.peak_bytes, max_micro_batch=max_micro, caveats=tuple(caveats),
        base_batch=workload.base_batch, base_lr=workload.base_lr, device=spec.name, usable_bytes=spec.usable_bytes,
        target=str(workload.target) if workload.target else None,
        predicted_steps_to_target=chosen.steps_to_target, predicted_time_to_target_s=chosen.time_to_target_s,
        lr_rule_note=lr_rule_note(rule, b_noise, chosen.global_batch),
        noise_note=noise_note(probe), why=why_text(chosen, base, largest, throughput, b_noise_used, workload),
        threads=torch.get_num_threads(), thread_choice={str(k): v for k, v in thread_scores.items()},
        alternatives=alternatives,
        candidates=tuple(c.to_dict() for c in candidates), throughput=throughput.to_dict(), memory=curve.to_dict(),
        noise_probe=probe.to_dict(), timings_s=timings, worlds=worlds_info,
    )


__all__ = ["make_plan", "has_batchnorm"]
