"""The plan's HTML report: M(B), samples/s and MFU, B_noise over the steps, goodput(B), and the why.

Everything is drawn from the plan's plain data (``Plan.to_dict()`` or a ``plan.json``), so a
report can be re-rendered from a saved plan.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from batchpilot.report.html import Section, write_html
from batchpilot.report.plan_figures import (  # noqa: F401 - re-exported: the figures are part of this module's API
    _fmt_bytes, _pair, chosen_band, goodput_band, goodput_figure, is_predicted, largest_alternative, memory_figure,
    noise_figure, throughput_figure, worlds_figure)


def efficiency_note(plan: dict) -> str:
    """What the efficiency column means, including values above 1."""
    b0 = plan["base_batch"]
    ns = plan.get("noise_scale")
    ns_text = f"{ns:.0f}" if isinstance(ns, (int, float)) and math.isfinite(ns) else "B_noise"
    return (f"Efficiency is relative to the base batch B0 = {b0}: (B_noise + B0)/(B_noise + B) with B_noise = {ns_text}, "
            f"the samples B0 needs to reach a given loss divided by the samples B needs (McCandlish et al. 2018). "
            f"It is 1 at B0, below 1 for larger batches and above 1 for batches below {b0}: a smaller batch is more "
            f"sample-efficient (it needs fewer samples to reach the same loss), though each of its samples is usually "
            f"slower to process. Goodput weighs the two.")


def rate_text(plan: dict, samples_per_s: float) -> str:
    """``"1234"`` samples/s, with tokens/s where the plan's loss unit is the token."""
    tps = plan.get("tokens_per_sample")
    return f"{samples_per_s:.0f}" + (f" ({samples_per_s * tps:,.0f} tokens/s)" if tps else "")


def noise_scale_text(plan: dict) -> str:
    """B_noise with how it was obtained: measured, GIVEN, or NOT MEASURED."""
    method = (plan.get("noise") or {}).get("method", "")
    ns = plan.get("noise_scale")
    if method == "not_measured":
        return "NOT MEASURED (efficiency 1: goodput = throughput)"
    value = f"{ns:.0f} samples" if isinstance(ns, (int, float)) and ns else "n/a"
    return value + (" (GIVEN, not measured)" if method == "given" else "")


def _summary_rows(plan: dict) -> list[list[Any]]:
    t = plan.get("predicted_time_to_target_s")
    predicted = is_predicted(plan)
    warm = plan["warmup_steps"]
    cb = chosen_band(plan)
    rows = [["setting", "value"],
            ["global batch", f"{plan['global_batch']} = {plan['micro_batch_per_rank']} micro × "
                             f"{plan['accumulation_steps']} accumulation × {plan['world_size']} rank(s)"],
            ["learning rate", f"{plan['lr']:.4g} ({plan['lr_rule']} rule from {plan['base_lr']:g} at batch {plan['base_batch']})"],
            ["warmup", f"{warm} step{'' if warm == 1 else 's'}"],
            ["noise scale B_noise", noise_scale_text(plan)],
            ["samples/s" + (" (PREDICTED)" if predicted else ""), rate_text(plan, plan["samples_per_s"])],
            ["efficiency (vs the base batch)", f"{plan['efficiency']:.3f}"],
            ["goodput" + (" (PREDICTED)" if predicted else ""), f"{plan['goodput']:.0f}" + (
                f" ({'predicted step-time' if predicted else 'timing'} band {cb[0]:.0f}–{cb[1]:.0f})" if cb else "")],
            ["peak memory per device", f"{_fmt_bytes(plan['peak_bytes'])} of {_fmt_bytes(plan['usable_bytes'])} usable"],
            ["largest micro-batch that fits in memory", plan["max_micro_batch"]]]
    if plan.get("amp"):
        rows.insert(4, ["precision", f"autocast {plan['amp']} (fp32 weights)"])
    largest = largest_alternative(plan)
    if largest is not None and largest[1] == "dataset":
        rows.append(["largest batch the training set allows (no accumulation)", largest[0]["global_batch"]])
    rows += [["predicted steps to target", plan.get("predicted_steps_to_target") or "n/a"],
             ["predicted training time to target", f"{t:.1f} s" if t is not None else "n/a"]]
    return rows


def _candidate_rows(plan: dict) -> list[list[Any]]:
    tps = plan.get("tokens_per_sample")
    rows = [["global batch", "micro × accum", "samples/s", *(["tokens/s"] if tps else []), "efficiency", "goodput",
             "goodput band", "LR", "warmup", "pred. steps", "pred. time (s)"]]
    for c in plan["candidates"]:
        mark = " ★" if (c["global_batch"], c["micro_batch_per_rank"]) == (plan["global_batch"], plan["micro_batch_per_rank"]) else ""
        mark += " (base)" if c["global_batch"] == plan["base_batch"] else ""
        rows.append([f"{c['global_batch']}{mark}", f"{c['micro_batch_per_rank']} × {c['accumulation_steps']}",
                     f"{c['samples_per_s']:.0f}", *([f"{c['samples_per_s'] * tps:,.0f}"] if tps else []),
                     f"{c['efficiency']:.3f}", f"{c['goodput']:.0f}",
                     "{:.0f}–{:.0f}".format(*_pair(c.get("goodput_band"))) if _pair(c.get("goodput_band")) else "n/a",
                     f"{c['lr']:.3g}",
                     c["warmup_steps"], c["steps_to_target"] if c["steps_to_target"] is not None else "n/a",
                     f"{c['time_to_target_s']:.2f}" if c["time_to_target_s"] is not None else "n/a"])
    return rows


def worlds_section(plan: dict) -> Section | None:
    """The world-size comparison (``plan --world-size 1,2,4,8``), or ``None`` when the plan has no ``worlds`` data."""
    worlds = plan.get("worlds") or {}
    if not worlds:
        return None
    paragraphs = []
    comm = worlds.get("comm")
    fsdp = worlds.get("strategy") == "fsdp"
    if fsdp:
        sc = worlds.get("sharded_comm") or {}
        paragraphs.append(
            f"FSDP (FSDP2 fully_shard over units {', '.join(worlds.get('units', []))}): every micro-batch all-gathers "
            f"the {_fmt_bytes(sc.get('param_bytes', 0))} of parameters before the forward"
            + (" and again before the backward" if sc.get("reshard_after_forward") else "")
            + f", and reduce-scatters the gradients after it; each moves (W−1)/W × bytes / bandwidth ({comm['source']}). "
            "The largest micro-batch per rank is traced at each world size; DDP's best is shown where the "
            "replicated step fits." + (f" Nothing fits under FSDP at {worlds['not_fitting']} rank(s)."
                                      if worlds.get("not_fitting") else ""))
    elif comm:
        paragraphs.append(f"Each optimizer step adds a ring all-reduce of the {_fmt_bytes(comm['gradient_bytes'])} gradient, "
                          f"2(W−1)/W × bytes / bandwidth + 2(W−1) × latency ({comm['source']}).")
    table = None
    figures = []
    rows = worlds.get("table") or []
    if rows:
        rec = worlds.get("recommended")
        margin = worlds.get("recommend_margin")
        paragraphs.append(f"Recommended world size: {rec}, the smallest whose goodput is within "
                          f"{margin:.0%} of the best listed." if isinstance(margin, (int, float)) else
                          f"Recommended world size: {rec}.")
        table = [["world size", "global batch = micro × accum × ranks", "step (ms)",
                  "all-gather + reduce-scatter (ms)" if fsdp else "all-reduce (ms)", "samples/s",
                  "efficiency", "goodput", "speedup", "scaling efficiency", "pred. time (s)"]
                 + (["largest micro-batch per rank", "DDP goodput"] if fsdp else [])]
        for r in rows:
            t = r.get("time_to_target_s")
            ddp = r.get("ddp")
            extra = [r["max_micro_batch_per_rank"], f"{ddp['goodput']:.0f}" if ddp else "does not fit"] if fsdp else []
            table.append([f"{r['world_size']}{' ★' if r['world_size'] == rec else ''}",
                          f"{r['global_batch']} = {r['micro_batch_per_rank']} × {r['accumulation_steps']} × {r['world_size']}",
                          f"{r['step_s'] * 1e3:.3g}", f"{r.get('comm_s', r['allreduce_s']) * 1e3:.3g}",
                          f"{r['samples_per_s']:.0f}", f"{r['efficiency']:.3f}", f"{r['goodput']:.0f}",
                          f"{r['speedup']:.2f}×", f"{r['scaling_efficiency']:.0%}", f"{t:.2f}" if t is not None else "n/a",
                          *extra])
        figures.append(worlds_figure(plan))
    elastic = [e for e in worlds.get("elastic") or [] if e.get("compatible")]
    if elastic:
        paragraphs.append(f"The chosen global batch {plan['global_batch']} at other world sizes (train --plan on that many "
                          "ranks keeps it): " + "; ".join(
                              f"{e['world_size']} rank(s): {e['micro_batch_per_rank']} × {e['accumulation_steps']}, "
                              f"{e['samples_per_s']:.0f} samples/s" for e in elastic) + ".")
    return Section("World size", paragraphs=paragraphs, table=table, figures=figures)


def skipped_text(plan: dict) -> list[str]:
    """One paragraph per stage the plan did not run, with the reason."""
    names = {"lr_check": "LR check", "noise_probe": "Noise probe", "confirm": "Confirmation runs"}
    return [f"{names.get(k, k)}: {v}." for k, v in (plan.get("skipped") or {}).items()]


def plan_sections(plan: dict) -> list[Section]:
    """The report's sections."""
    th = plan["throughput"]
    mem = plan["memory"]
    largest = largest_alternative(plan)
    limits = ""
    if largest is not None and largest[1] == "dataset":
        limits = (f" Memory is not what limits the batch here: without accumulation the training set caps it at "
                  f"{largest[0]['global_batch']} (one step per epoch).")
    sections = [
        Section("The plan", paragraphs=[plan["why"]], table=_summary_rows(plan), caveats=plan["caveats"]),
        Section("Memory M(B)", paragraphs=[
            f"Peak step memory per device, M(B) = {_fmt_bytes(mem['fixed_bytes'])} + {_fmt_bytes(mem['per_sample_bytes'])}"
            f" × B, by {mem['method']}. The largest micro-batch within the {_fmt_bytes(plan['usable_bytes'])} usable on "
            f"{plan['device']} is {plan['max_micro_batch']}.{limits}"], figures=[memory_figure(plan)]),
        Section("Throughput and MFU", paragraphs=[
            ("PREDICTED, not measured: the target GPU is not here, so every step time below comes from the traced "
             "FLOPs and bytes of one step against its datasheet peak and bandwidth (docs/gpu.md). "
             if str(th.get("peak_source", "")).startswith("predicted") else "") +
            f"Median full step (fetch, forward, backward, optimizer) on a fresh model, fitted as step_s(B) = "
            f"{th['overhead_s'] * 1e3:.3g} ms + {th['per_sample_s'] * 1e6:.3g} µs × B; the fixed cost is a tenth of "
            f"the step near batch {th['saturation_batch']:.0f}. MFU uses FlopCounterMode FLOPs over a peak of "
            f"{th['peak_flops'] / 1e9:.1f} GFLOP/s ({th['peak_source']})." +
            (f" Goodput bands: {plan['goodput_band_source']}." if plan.get("goodput_band_source") else "") +
            (f" Tokens/s = samples/s × {plan['tokens_per_sample']} tokens per sample." if plan.get("tokens_per_sample")
             else "")], figures=[throughput_figure(plan)]),
        Section("Gradient noise scale", paragraphs=[plan["noise_note"], *skipped_text(plan)],
                figures=[noise_figure(plan)] if (plan.get("noise_probe") or {}).get("points") else []),
        Section("Goodput and the alternatives", paragraphs=[efficiency_note(plan), plan["lr_rule_note"]],
                table=_candidate_rows(plan), figures=[goodput_figure(plan)]),
    ]
    world = worlds_section(plan)
    if world is not None:
        sections.append(world)
    return sections


def write_plan_report(plan: dict, path: str | Path) -> Path:
    """Write the self-contained ``report.html`` for a plan (``Plan.to_dict()`` or a loaded ``plan.json``)."""
    return write_html(path, f"batchpilot plan: {plan['workload']}", plan_sections(plan),
                      subtitle=f"device {plan['device']}, target {plan.get('target') or 'none'}")
