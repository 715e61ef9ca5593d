"""``make_plan``: memory -> throughput -> LR check -> noise probe (-> confirmation) -> goodput search -> the plan.

Each stage is measured on fresh objects under a forked RNG; nothing of the caller's changes.
``_make_plan`` reads as the list of those steps; each step is a function of what the earlier ones measured.
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
from batchpilot.plan import sharded_worlds as sw
from batchpilot.plan import worlds as wd
from batchpilot.plan.measured_noise import confirm as _confirm
from batchpilot.plan.measured_noise import noise_from_probe
from batchpilot.plan.no_training import NoiseSource, skipped_stages
from batchpilot.plan import no_training
from batchpilot.plan.lr_check import LRCheck, check_base_lr, with_checked_lr
from batchpilot.plan.noise_trend import samples_to_target
from batchpilot.plan.probe import NoiseProbe, probe_micro_batch, probe_noise
from batchpilot.plan.result import Plan
from batchpilot.plan.worlds import CommModel
from batchpilot.plan.text import caveats_for, lr_rule_note, noise_note, why_text
from batchpilot.scaling.lr_rules import LR_RULES, default_lr_rule
from batchpilot.throughput import predict
from batchpilot.throughput.amp import AMP_DTYPES, amp_policy
from batchpilot.throughput.band import Calibration
from batchpilot.throughput.measure import ThroughputCurve, choose_cpu_threads, default_batches, measure_throughput
from batchpilot.workloads import Workload

Progress = Callable[[str, float], None]
STAGES = (("memory", 0.05), ("throughput", 0.25), ("lr_check", 0.15), ("noise", 0.35), ("confirm", 0.15),
          ("plan", 0.05))
_STAGE_START = {name: sum(w for _, w in STAGES[:i]) for i, (name, _) in enumerate(STAGES)}


def _staged(progress: Progress | None, stage: str) -> Progress | None:
    if progress is None:
        return None
    start = _STAGE_START[stage]
    width = dict(STAGES)[stage]
    return lambda desc, frac: progress(desc, start + width * max(0.0, min(1.0, frac)))


def has_batchnorm(workload: Workload) -> bool:
    """Whether the workload's model has BatchNorm layers (built under a forked RNG, on the meta device when it
    can be: a 124M-parameter model then costs no memory and no initialisation)."""
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                model = workload.make_model()
        except Exception:  # noqa: BLE001 - a factory that needs real tensors (loads weights ...): build it for real
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
    throughput_budget_s: float = 20.0,
    noise_budget_s: float = 30.0,
    lr_check: bool = True,
    lr_check_budget_s: float = 15.0,
    confirm: bool = True,
    confirm_budget_s: float = 40.0,
    seed: int = 0,
    progress: Progress | None = None,
    probe: NoiseProbe | None = None,
    throughput: ThroughputCurve | None = None,
    world_sizes: Sequence[int] | None = None,
    allreduce_gbps: float | None = None,
    comm: CommModel | None = None,
    amp: str | None = None,
    noise_scale: float | None = None,
    calibration: Calibration | None = None,
    strategy: str = "ddp",
    reshard_after_forward: bool = True,
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
        throughput_budget_s: time budget of the interleaved throughput rounds.
        noise_budget_s: time budget of the noise probe (it stops at the target if that comes first;
            it never needs to reach it: the noise scale and the samples to the target are extrapolated).
        lr_check, lr_check_budget_s: check the base LR with short runs first (:mod:`.lr_check`).
        confirm, confirm_budget_s: measure B_crit with short runs at larger batches (:mod:`.confirm`)
            and plan with it instead of the noise scale (on by default: it tracked the sweeps' B_crit
            better than B_simple on every bench workload; ``confirm=False`` plans from B_simple alone).
        seed: seeds the measurement runs.
        progress: ``progress(description, fraction)``.
        probe, throughput: reuse earlier measurements instead of measuring again (a given probe also
            skips the LR check: it was trained at its own LR).
        world_sizes: plan at each of these world sizes and recommend one (:mod:`.worlds`); the plan's
            ``world_size`` is then the recommended one and ``worlds`` holds the table.
        allreduce_gbps: all-reduce bus bandwidth for world sizes > 1 (default: measured with gloo here).
        comm: a ready all-reduce model (overrides ``allreduce_gbps``).
        amp: ``bfloat16``/``float16`` autocast (fp32 weights): memory traced, throughput measured or predicted
            and MFU taken against the half-precision peak; ``train --plan`` trains with it. ``None``: fp32.
        noise_scale: a GIVEN B_noise in samples: no noise probe or confirmation runs, goodput uses it
            (:mod:`.no_training`). A memory-only workload (``hf:gpt2``) trains nothing here: it needs a GPU
            that is present or tabled for prediction, and without ``noise_scale`` its goodput is throughput.
        calibration: measured/predicted step times on a GPU (:func:`batchpilot.throughput.band.load_calibration`):
            a predicted step time is multiplied by its factor and carries its band instead of the documented one.
        strategy: ``ddp`` (replicated) or ``fsdp`` (FSDP2: memory per rank traced at each world size, the
            all-gathers and reduce-scatters in the step time, DDP compared where it fits: :mod:`.sharded_worlds`).
        reshard_after_forward: FSDP's ZeRO-3 (True) or ZeRO-2-like (False) mode.
    """

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise BatchpilotError(f"world size must be a positive integer, got {world_size!r}")
    if strategy not in ("ddp", "fsdp"):
        raise BatchpilotError(f"strategy must be ddp or fsdp, got {strategy!r}")
    if lr_rule is not None and lr_rule not in LR_RULES:
        raise BatchpilotError(f"lr rule must be one of {', '.join(LR_RULES)}, got {lr_rule!r}")
    for name, value in (("throughput budget", throughput_budget_s), ("noise budget", noise_budget_s),
                        ("LR-check budget", lr_check_budget_s), ("confirm budget", confirm_budget_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise BatchpilotError(f"the {name} must be > 0 seconds, got {value!r}")
    if amp is not None and amp not in AMP_DTYPES:
        raise BatchpilotError(f"amp must be one of {', '.join(AMP_DTYPES)} or None, got {amp!r}")
    NoiseSource(noise_scale, "given")  # validates the value
    before = torch.get_num_threads()
    try:
        return _make_plan(workload, device=device, memory=memory, world_size=world_size, lr_rule=lr_rule,
                          threads=threads, throughput_budget_s=throughput_budget_s, noise_budget_s=noise_budget_s,
                          lr_check=lr_check and probe is None, lr_check_budget_s=lr_check_budget_s, confirm=confirm,
                          confirm_budget_s=confirm_budget_s, seed=seed, progress=progress, probe=probe,
                          throughput=throughput, world_sizes=tuple(world_sizes) if world_sizes else None,
                          allreduce_gbps=allreduce_gbps, comm=comm, amp=amp, noise_scale=noise_scale,
                          calibration=calibration, strategy=strategy, reshard_after_forward=reshard_after_forward)
    finally:
        torch.set_num_threads(before)


def _make_plan(workload, *, device, memory, world_size, lr_rule, threads, throughput_budget_s, noise_budget_s,
               lr_check, lr_check_budget_s, confirm, confirm_budget_s, seed, progress, probe, throughput,
               world_sizes=None, allreduce_gbps=None, comm=None, amp=None, noise_scale=None, calibration=None,
               strategy="ddp", reshard_after_forward=True) -> Plan:
    from batchpilot.memory import memory_curve, resolve_device

    if world_sizes:
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in world_sizes):
            raise BatchpilotError(f"world sizes must be positive integers, got {list(world_sizes)}")
        world_sizes = tuple(sorted(set(world_sizes)))
        world_size = world_sizes[0]  # the measurements' batch cap
    timings: dict[str, float] = {}
    spec = resolve_device(device, memory)
    measure_device = "cuda" if spec.kind == "cuda" and torch.cuda.is_available() else "cpu"
    predicted_target = measure_device == "cpu" and spec.kind == "cuda" and predict.gpu_model(spec.name) is not None
    memory_only = bool(workload.memory_only)
    if memory_only and measure_device == "cpu" and not predicted_target:
        raise BatchpilotError(f"workload {workload.name!r} is memory-only: plan trains nothing of it and cannot time it "
                              f"on this CPU; plan it for a GPU (--device H100: memory traced, step time predicted; known: "
                              f"{', '.join(predict.predictable_gpus())}) or on a CUDA machine (--device cuda)")
    if amp is not None:  # fp16 on this CPU is refused unless the CPU only times the probe for a predicted GPU
        amp_policy(amp, "cuda" if measure_device == "cuda" or predicted_target else "cpu")

    # 1. memory: M(B) and the largest micro-batch
    t0 = time.perf_counter()
    step = _staged(progress, "memory")
    if step:
        step(f"memory: tracing {workload.name}", 0.0)
    curve = memory_curve(workload, device="cuda" if spec.kind == "cuda" else "cpu", amp=amp is not None,
                         dtype=amp or "float32")
    sharded = None
    if strategy == "fsdp":  # memory per rank at every world size; the replicated curve stays for DDP's column
        world_sizes = world_sizes or (world_size,)
        # fp32 master weights; with amp, FSDP's mixed precision computes in bf16 (memory/sharded_trace.py)
        sharded = sw.fsdp_memory(workload, world_sizes, spec, reshard_after_forward=reshard_after_forward,
                                 amp=amp is not None)
        max_micro = sharded.max_micro[world_sizes[0]] or max(sharded.max_micro.values())
    else:
        curve.check_budget(spec.usable_bytes, f"the usable memory of {spec.name}")
        max_micro = curve.max_micro_batch(spec.usable_bytes)
    timings["memory"] = time.perf_counter() - t0
    # the training set caps the batch; a memory-only workload's random tokens are not the user's data
    max_global = (max_micro * max(world_sizes or (world_size,)) * gp.MAX_ACCUMULATION if memory_only
                  else workload.num_train)
    per_rank_cap = max_global // world_size
    if per_rank_cap < 1:
        raise BatchpilotError(f"world size {world_size} exceeds the training set ({workload.num_train} samples)")
    max_batch = min(max_micro, per_rank_cap)

    # 2. throughput: CPU threads, then interleaved timing rounds (a memory-only workload is never timed here)
    t0 = time.perf_counter()
    thread_scores: dict[int, float] = {}
    base_step_s = 0.0
    if throughput is None and memory_only and measure_device == "cpu":
        step = _staged(progress, "throughput")
        if step:
            step(f"throughput: predicting {spec.name} from traced ops", 0.0)
    else:
        thread_scores = _set_threads(workload, threads, measure_device, throughput, max_batch, seed, progress)
        if throughput is None:
            batches = set(default_batches(workload.base_batch, max_batch))
            batches |= {b for b in (workload.base_batch, probe_micro_batch(workload.base_batch)) if b <= max_batch}
            measure_amp = None if (amp == "float16" and measure_device == "cpu") else amp
            throughput = measure_throughput(workload, batch_sizes=sorted(batches), device=measure_device,
                                            time_budget_s=max(5.0, throughput_budget_s - (time.perf_counter() - t0)),
                                            seed=seed, progress=_staged(progress, "throughput"), amp=measure_amp)
        base_step_s = throughput.step_s(workload.base_batch)  # this machine's: it times the LR check and the probe
    # a named GPU that is not here: goodput from its predicted step times, not this CPU's (throughput/predict.py)
    throughput, measure_device = predict.for_plan(workload, spec, throughput, measure_device, max_batch=max_batch,
                                                  amp=amp, calibration=calibration)
    timings["throughput"] = time.perf_counter() - t0

    # 3-5: the statistics (LR check, noise probe, confirmation), or a given / unmeasured noise scale
    rule = lr_rule or default_lr_rule(workload.optimizer_family())
    steps_per_epoch = 1 if memory_only else math.ceil(workload.num_train / workload.base_batch)
    common = dict(throughput=throughput, memory=curve, base_batch=workload.base_batch, base_lr=workload.base_lr,
                  lr_rule=rule, anchor=None, steps_per_epoch_base=steps_per_epoch)
    micro_choices = micro_batch_choices(throughput.batches, max_micro, max_global)
    checked: LRCheck | None = None
    source: NoiseSource | None = None
    skipped: dict[str, str] = {}
    extrapolation = None
    if memory_only or noise_scale is not None:
        why = ("the workload is memory-only (random tokens at full size): training it here would measure nothing of "
               "the user's data and take hours on this CPU" if memory_only else "--noise-scale was given")
        source = NoiseSource(noise_scale, why)
        lr_check = lr_check and not memory_only
        skipped = skipped_stages(why, lr_check=memory_only, probe=True)
    for stage in ("lr_check", "noise", "confirm"):
        timings[stage] = 0.0
    if lr_check:  # 3. the base LR, checked
        t0 = time.perf_counter()
        step = _staged(progress, "lr_check")
        if step:
            step("LR check: short runs at the base batch", 0.0)
        checked = check_base_lr(workload, steps=_lr_check_steps(workload, base_step_s, lr_check_budget_s),
                                seed=seed, time_budget_s=lr_check_budget_s)
        workload = with_checked_lr(workload, checked)
        common["base_lr"] = workload.base_lr
        timings["lr_check"] = time.perf_counter() - t0
    if source is not None:
        probe, noise = None, source.noise_dict()
    else:
        t0 = time.perf_counter()  # 4. the noise probe at the base batch
        if probe is None:
            probe = probe_noise(workload, time_budget_s=noise_budget_s, seed=seed, progress=_staged(progress, "noise"),
                                step_s=base_step_s)
        timings["noise"] = time.perf_counter() - t0
        noise = noise_from_probe(probe, workload)
        if probe.samples_to_target:  # the probe met the target: measured
            samples, extrapolation = float(probe.samples_to_target), 1.0
        else:
            samples, extrapolation = samples_to_target(
                [(p.samples, p.metric) for p in probe.points if p.metric is not None], workload.target)
        common["anchor"] = (probe.batch, float(samples)) if samples else None
        # 5. B_crit from short runs at larger batches replaces the noise scale (on by default; --no-confirm skips)
        t0 = time.perf_counter()
        if confirm:
            noise = _confirm(workload, probe, noise, common, max_micro=max_micro, world_size=world_size, seed=seed,
                             budget_s=confirm_budget_s, progress=_staged(progress, "confirm"))
        timings["confirm"] = time.perf_counter() - t0
    anchor = common["anchor"]
    b_noise_used = noise["b_used"]

    # 6. the goodput search, at one world size or several
    step = _staged(progress, "plan")
    if step:
        step("plan: goodput search", 0.0)
    worlds_info: dict = {}
    elastic_sizes: Sequence[int] | None = None
    if sharded is not None:  # FSDP: all-gathers and reduce-scatters per micro-batch (plan/sharded_worlds.py)
        comm = comm or (wd.comm_model(workload, allreduce_gbps=allreduce_gbps) if max(world_sizes) > 1 else
                        CommModel(wd.gradient_bytes(workload), 1.0, 0.0, "none needed: one rank"))
        fsdp_step, worlds_info, world_size = sw.fsdp_worlds(
            sharded, comm, world_sizes, curve=curve, usable_bytes=spec.usable_bytes, common=common,
            micro_choices=micro_choices, max_global_batch=max_global, b_noise=b_noise_used,
            throughput=throughput)
        max_micro = sharded.max_micro[world_size]
        max_batch = min(max_micro, max_global // world_size)
        common["throughput"] = fsdp_step(world_size)
        common["memory"] = sharded.memories[world_size].curve
        with_comm = fsdp_step
        elastic_sizes = world_sizes  # only the traced sizes: the largest micro-batch differs at each
    elif max(world_sizes or (world_size,)) > 1:  # the all-reduce term (plan/worlds.py)
        comm = comm or wd.comm_model(workload, allreduce_gbps=allreduce_gbps)
        with_comm = lambda w: wd.StepTimeWithComm(throughput, comm.allreduce_s(w))  # noqa: E731
        if world_sizes:
            def best_at(w: int) -> gp.Candidate:
                return gp.choose(gp.search(micro_choices=micro_choices, world_size=w, max_micro_batch=max_micro,
                                           max_global_batch=max_global, b_noise=b_noise_used,
                                           **{**common, "throughput": with_comm(w)}), throughput)
            rows, world_size = wd.compare_world_sizes(world_sizes, best_at, comm)
            worlds_info = {"world_sizes": list(world_sizes), "recommended": world_size,
                           "recommend_margin": wd.RECOMMEND_MARGIN, "table": [asdict(r) for r in rows]}
            max_batch = min(max_micro, max_global // world_size)
        common["throughput"] = with_comm(world_size)
        worlds_info["comm"] = comm.to_dict()
    candidates = gp.search(micro_choices=micro_choices, world_size=world_size, max_micro_batch=max_micro,
                           max_global_batch=max_global, b_noise=b_noise_used, **common)
    chosen = gp.choose(candidates, throughput)
    tied = tuple(c.global_batch for c in gp.ties(candidates, throughput))
    largest = gp.evaluate(max_batch, 1, world_size=world_size, b_noise=b_noise_used, **common)
    base = next((c for c in candidates if c.global_batch == workload.base_batch), None)
    alternatives = {"largest_that_fits": largest.to_dict()}
    if base is not None:
        alternatives["base_batch"] = base.to_dict()
    for name, scale in (("noise_low", 0.5), ("noise_high", 2.0)) if math.isfinite(b_noise_used) else ():
        alt = gp.choose(gp.search(micro_choices=micro_choices, world_size=world_size, max_micro_batch=max_micro,
                                  max_global_batch=max_global, b_noise=b_noise_used * scale, **common),
                        throughput)
        alternatives[f"best_if_{name}"] = alt.to_dict()
    if worlds_info:
        listed = world_sizes or (world_size,)
        sizes = sorted(set(listed) | {1 << i for i in range(max(listed).bit_length())})  # and the powers of two
        per_world = (lambda w: sharded.max_micro[w]) if sharded is not None else max_micro  # noqa: E731
        worlds_info["elastic"] = wd.elastic_splits(chosen.global_batch, elastic_sizes or sizes,
                                                   max_micro_batch=per_world, step_model=with_comm)
        worlds_info["compatible_world_sizes"] = wd.compatible_world_sizes(chosen.global_batch)

    # 7. the words and the record
    caveats = caveats_for(workload=workload, chosen=chosen, probe=probe, throughput=throughput,
                          curve=common["memory"], batchnorm=has_batchnorm(workload), measured_on=measure_device,
                          spec=spec, candidates=candidates, world_size=1 if sharded is not None else world_size,
                          b_noise_used=b_noise_used,
                          comm_note=worlds_info["comm"]["source"] if "comm" in worlds_info else None,
                          num_train=None if memory_only else workload.num_train, noise_given=noise_scale is not None)
    if sharded is not None:  # FSDP's collectives instead of the all-reduce's words
        caveats += sw.fsdp_caveats(worlds_info, world_size)
    caveats += predict.plan_caveats(throughput, calibration)  # says so when the throughput is predicted
    if source is not None:
        caveats += no_training.caveats(source, lr_checked=checked is not None, memory_only=memory_only,
                                       batch_ratio=chosen.global_batch / workload.base_batch)
    if extrapolation and extrapolation > 1:
        caveats.append(f"the probe stopped before the target: the samples to {workload.target} at the base batch are "
                       f"extrapolated {extrapolation:.1f}x beyond the {probe.points[-1].samples} samples it trained, "
                       "so the predicted steps and time are estimates")
    elif anchor is None and workload.target is not None and probe is not None:
        caveats.append(f"the probe's learning curve does not yet point at {workload.target}: no prediction of the "
                       "steps to the target (give the probe a longer --probe-budget)")
    noise["samples_to_target_extrapolation"] = extrapolation
    timings["plan"] = sum(timings.values())
    step_band = predict.band_of(throughput, calibration)  # a predicted step's band, into every goodput (band.py)
    if step_band is not None:
        bands = [step_band.rate(c.goodput) for c in candidates]
        chosen_band, band_source = step_band.rate(chosen.goodput), f"PREDICTED step time: {step_band.describe()}"
    else:
        bands = [gp.goodput_band(c, chosen, throughput) for c in candidates]
        chosen_band, band_source = _band(candidates, chosen, throughput), "measured: timing rounds"
    low_rel = _rel(probe.b_noise_low, probe.b_noise_effective) if probe is not None else 1.0
    high_rel = _rel(probe.b_noise_high, probe.b_noise_effective) if probe is not None else 1.0
    return Plan(
        workload=workload.name, micro_batch_per_rank=chosen.micro_batch_per_rank,
        accumulation_steps=chosen.accumulation_steps, world_size=world_size, global_batch=chosen.global_batch,
        lr=chosen.lr, lr_rule=rule, warmup_steps=chosen.warmup_steps, schedule="constant",
        noise_scale=b_noise_used, noise_scale_low=b_noise_used * low_rel, noise_scale_high=b_noise_used * high_rel,
        samples_per_s=chosen.samples_per_s, efficiency=chosen.efficiency, goodput=chosen.goodput,
        peak_bytes=chosen.peak_bytes, max_micro_batch=max_micro, caveats=tuple(caveats),
        base_batch=workload.base_batch, base_lr=workload.base_lr, device=spec.name, usable_bytes=spec.usable_bytes,
        target=str(workload.target) if workload.target else None,
        predicted_steps_to_target=chosen.steps_to_target, predicted_time_to_target_s=chosen.time_to_target_s,
        lr_rule_note=lr_rule_note(rule, b_noise_used, chosen.global_batch, given=noise_scale is not None),
        noise_note=noise_note(probe, noise) if probe is not None else source.note(),
        why=why_text(chosen, base, largest, throughput, b_noise_used, workload, tokens_per_sample=tokens_per_sample(workload)),
        threads=torch.get_num_threads(), thread_choice={str(k): v for k, v in thread_scores.items()},
        alternatives=alternatives,
        candidates=tuple({**c.to_dict(), "goodput_band": band} for c, band in zip(candidates, bands)),
        throughput=throughput.to_dict(), memory=curve.to_dict(), noise_probe=probe.to_dict() if probe else {},
        timings_s=timings, worlds=worlds_info, noise=noise, lr_check=checked.to_dict() if checked else {},
        goodput_band=chosen_band, goodput_band_source=band_source,
        tied_batches=tied,
        probe_cost_s=timings["lr_check"] + timings["noise"] + timings["confirm"],
        amp=amp, tokens_per_sample=tokens_per_sample(workload), memory_only=memory_only, skipped=skipped,
    )


def tokens_per_sample(workload: Workload) -> int | None:
    """Tokens per sample when the workload's loss unit is the token (a language-model head), else ``None``."""
    from batchpilot.workloads.spec import count_tokens

    return workload.seq_len if workload.count_units is count_tokens and workload.seq_len else None


def micro_batch_choices(measured: Sequence[int], max_micro: int, num_train: int) -> list[int]:
    """Micro-batches the search may use: the measured ones that fit, and every power of two up to the largest
    that fits in memory and the training set, whose step times the throughput model extrapolates. Without the
    unmeasured ones a batch past the timing budget could only be reached by accumulation, though it fits whole."""
    cap = min(max_micro, num_train)
    powers = {1 << k for k in range(cap.bit_length()) if 1 << k <= cap}
    return sorted({b for b in measured if b <= max_micro} | powers)


def _rel(value: float, ref: float) -> float:
    """``value / ref`` for an interval end, 1 when either is not a positive finite number."""
    return value / ref if value > 0 and ref > 0 and math.isfinite(value) and math.isfinite(ref) else 1.0


def _band(candidates, chosen, throughput) -> tuple[float, float]:
    """The chosen goodput's band: the widest timing uncertainty against any measured batch."""
    u = max((gp.log_uncertainty(throughput, c.micro_batch_per_rank, chosen.micro_batch_per_rank) for c in candidates),
            default=0.0)
    return chosen.goodput * math.exp(-u), chosen.goodput * math.exp(u)


def _set_threads(workload, threads, measure_device, throughput, max_batch, seed, progress) -> dict[int, float]:
    """Apply ``threads``, or measure 1 thread against the current count on a CPU and keep the faster."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise BatchpilotError(f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
        return {}
    if measure_device != "cpu" or throughput is not None or torch.get_num_threads() == 1:
        return {}
    if progress:
        progress("throughput: choosing CPU threads", _STAGE_START["throughput"])
    probe_batches = sorted({min(workload.base_batch, max_batch), min(4 * workload.base_batch, max_batch)})
    best, scores = choose_cpu_threads(workload, probe_batches, seed=seed)
    torch.set_num_threads(best)
    return scores


def _lr_check_steps(workload: Workload, base_step_s: float, budget_s: float, runs: int = 4) -> int:
    """Steps per LR-check run: one epoch, at most 100 steps, fewer (but at least 30) if the budget demands.

    Fixed when the budget allows, so that timing noise does not change the check's verdict.
    """
    epoch = math.ceil(workload.num_train / workload.base_batch)
    fits = int(budget_s / (runs * max(base_step_s, 1e-6) * 1.5))  # 1.5: the trainer's own overhead
    return max(30, min(epoch, 100, fits))


__all__ = ["make_plan", "has_batchnorm", "noise_from_probe"]
