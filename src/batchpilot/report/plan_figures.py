"""The plan report's figures (matplotlib): M(B) against the device, samples/s and MFU, B_noise over the
probe, goodput(B) with its band, and the world sizes of a distributed plan. Each takes the plan's plain
data (``Plan.to_dict()`` or a ``plan.json``) and returns a figure; :mod:`batchpilot.report.plan_report`
lays them out with the tables and the why.
"""

from __future__ import annotations

import math


def _gib(x: float) -> float:
    return x / 2**30


def _mem_at(mem: dict, b: float) -> float:
    return max(mem["fixed_bytes"] + mem["per_sample_bytes"] * b, mem["step_fixed_bytes"] + mem["step_per_sample_bytes"] * b)


def _fmt_bytes(x: float | None) -> str:
    if x is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def memory_figure(plan: dict):
    """M(B): the fitted line, the traced points, the usable budget and the chosen micro-batch."""
    import matplotlib.pyplot as plt

    mem = plan["memory"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    top = max(plan["max_micro_batch"], plan["micro_batch_per_rank"] * 4, 8)
    top = min(top, max(plan["micro_batch_per_rank"] * 64, 1024))
    traced = {int(k): v for k, v in mem.get("peak_bytes_at", {}).items()}
    top = max([top, *traced])  # the curve reaches every traced point
    xs = [2 ** (math.log2(top) * i / 100) for i in range(101)]
    last = max(traced) if traced else top
    inside = [x for x in xs if x <= last]
    line, = ax.plot(inside, [_mem_at(mem, x) / 2**20 for x in inside], label="fitted M(B)")
    beyond = ([inside[-1]] if inside else []) + [x for x in xs if x > last]
    if len(beyond) > 1:
        ax.plot(beyond, [_mem_at(mem, x) / 2**20 for x in beyond], "--", color=line.get_color(),
                label=f"extrapolated past B={last} (largest traced)")
        ax.axvspan(last, xs[-1], color="0.92", zorder=0)
    if traced:
        ax.scatter(list(traced), [v / 2**20 for v in traced.values()], color="k", zorder=3, label="traced")
    if plan["max_micro_batch"] <= top:
        ax.axhline(plan["usable_bytes"] / 2**20, color="r", ls="--", label="usable memory")
    ax.axvline(plan["micro_batch_per_rank"], color="g", ls=":", label=f"chosen micro-batch {plan['micro_batch_per_rank']}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("micro-batch per device")
    ax.set_ylabel("peak step memory (MiB)")
    ax.legend(fontsize=8)
    ax.set_title(f"Memory M(B) (largest micro-batch that fits in memory: {plan['max_micro_batch']})")
    return fig


def is_predicted(plan: dict) -> bool:
    """Whether the plan's throughput is a prediction for a GPU that is not here (throughput/predict.py)."""
    return str((plan.get("throughput") or {}).get("peak_source", "")).startswith("predicted")


def _plain_log_ticks(axis) -> None:
    """Log-axis labels as plain numbers (``2``, ``40``, ``0.5``) instead of ``2×10^0`` that crowd each other."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    span = hi / lo if lo > 0 else 1e9
    subs = (tuple(range(1, 10)) if span < 4 else (1.0, 2.0, 3.0, 5.0) if span < 30 else (1.0, 2.0, 5.0) if span < 1e4 else (1.0,))
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def throughput_figure(plan: dict):
    """Measured samples/s (with the fitted line) and MFU against the batch, side by side."""
    import matplotlib.pyplot as plt

    th = plan["throughput"]
    pts = th["points"]
    bs = [p["batch"] for p in pts]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    predicted = str(th.get("peak_source", "")).startswith("predicted")  # an absent GPU (throughput/predict.py)
    ax.plot(bs, [p["samples_per_s"] for p in pts], "o-",
            label="PREDICTED, not measured" if predicted else "measured (median step)")
    cands = plan.get("candidates") or []
    one = {c["global_batch"]: c for c in cands if c.get("accumulation_steps") == 1 and c.get("world_size", 1) == 1}
    if predicted and one and all(_pair(c.get("goodput_band")) for c in one.values()):  # efficiency-free band: x rate
        xs = sorted(one)
        ratio = [(_pair(one[b]["goodput_band"])[0] / one[b]["goodput"], _pair(one[b]["goodput_band"])[1] / one[b]["goodput"])
                 if one[b]["goodput"] > 0 else (1.0, 1.0) for b in xs]
        ax.fill_between(xs, [one[b]["samples_per_s"] * r[0] for b, r in zip(xs, ratio)],
                        [one[b]["samples_per_s"] * r[1] for b, r in zip(xs, ratio)], alpha=0.18,
                        label="PREDICTED step-time band")
    ax.plot(bs, [b / (th["overhead_s"] + th["per_sample_s"] * b) for b in bs], "--", color="gray",
            label="fit: B / (overhead + per_sample·B)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (no accumulation)")
    tps = plan.get("tokens_per_sample")
    ax.set_ylabel(f"samples/s (× {tps} = tokens/s)" if tps else "samples/s")
    ax.legend(fontsize=8)
    ax.set_title(f"Throughput on {th['device']}" if predicted else
                 f"Throughput on {th['device']} ({th['threads']} thread{'' if th['threads'] == 1 else 's'})")
    ax2.plot(bs, [100 * p["mfu"] for p in pts], "s-", color="tab:orange")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("batch (no accumulation)")
    ax2.set_ylabel("MFU (%)")
    ax2.set_title("Model FLOP utilisation")
    fig.tight_layout()
    return fig


def noise_figure(plan: dict):
    """B_noise over the probe's steps: smoothed estimate with its band, phase values, the value used."""
    import matplotlib.pyplot as plt

    probe = plan["noise_probe"]
    pts = probe["points"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = [p["step"] for p in pts]
    finite = lambda v: v if v is not None and math.isfinite(v) and v > 0 else float("nan")  # noqa: E731
    ax.plot(steps, [finite(p["b_noise"]) for p in pts], label="smoothed B_noise (EMA)")
    ax.fill_between(steps, [finite(p["b_noise_low"]) for p in pts], [finite(p["b_noise_high"]) for p in pts],
                    alpha=0.2, label="80% bootstrap band")
    batch = probe["batch"]
    ph = probe["phases"]
    if ph:  # phase p covers the samples after phase p-1 up to its own end
        xs = [0.0] + [s / batch for s, _ in ph]
        ys = [finite(ph[0][1])] + [finite(b) for _, b in ph]
        ax.step(xs, ys, where="pre", color="k", label="per-phase value")
    if plan["noise_scale"]:
        ax.axhline(plan["noise_scale"], color="g", ls="--", label=f"used: {plan['noise_scale']:.0f}")
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel(f"optimizer step at batch {batch}")
    ax.set_ylabel("B_noise (samples)")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Gradient noise scale during training")
    return fig


def largest_alternative(plan: dict) -> tuple[dict, str, str] | None:
    """The "largest batch without accumulation" alternative, what limits it, and a label that says which.

    The planner evaluates ``min(largest micro-batch that fits in memory, training set / world size)``
    with no accumulation; the two limits mean different things, so the label names the one that binds.
    Returns ``(alternative, "memory" | "dataset", label)`` or ``None`` when the plan has none.
    """
    a = plan.get("alternatives", {}).get("largest_that_fits")
    if not a:
        return None
    if a["micro_batch_per_rank"] >= plan["max_micro_batch"]:
        return a, "memory", f"largest that fits in memory (no accumulation) {a['global_batch']}"
    return a, "dataset", (f"dataset cap {a['global_batch']} (memory alone "
                          f"would allow {plan['max_micro_batch']})")


def _pair(v) -> tuple[float, float] | None:
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return float(v[0]), float(v[1])
    return None


def goodput_band(plan: dict) -> tuple[list[float], list[float], list[float]] | None:
    """The goodput uncertainty band over the candidates as ``(global batches, low, high)``, or ``None``.

    Read from each candidate's ``goodput_band`` (``[low, high]``, as ``batchpilot plan`` writes it) or
    ``goodput_low``/``goodput_high``, or from a plan-level list of ``{global_batch, low, high}`` (or a dict
    of such lists). ``None`` when absent (older plans) or of zero width everywhere (nothing to draw).
    """
    cands = plan.get("candidates") or []
    rows = []
    if cands and all(_pair(c.get("goodput_band")) for c in cands):
        rows = [(c["global_batch"], *_pair(c["goodput_band"])) for c in cands]
    elif cands and all(c.get("goodput_low") is not None and c.get("goodput_high") is not None for c in cands):
        rows = [(c["global_batch"], c["goodput_low"], c["goodput_high"]) for c in cands]
    else:
        band = plan.get("goodput_band")
        if isinstance(band, list) and band and all(isinstance(r, dict) for r in band):
            rows = [(r.get("global_batch"), r.get("low", r.get("goodput_low")), r.get("high", r.get("goodput_high")))
                    for r in band]
        elif isinstance(band, dict):
            bs = band.get("global_batch") or band.get("global_batches") or band.get("batches") or []
            rows = list(zip(bs, band.get("low") or band.get("goodput_low") or [],
                            band.get("high") or band.get("goodput_high") or []))
        rows = [r for r in rows if all(isinstance(v, (int, float)) for v in r)]
    if not rows or all(hi - lo <= 0 for _, lo, hi in rows):
        return None
    best: dict[float, tuple[float, float]] = {}
    for b, lo, hi in rows:  # several splits of one global batch: the widest band
        old = best.get(b)
        best[b] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    bs = sorted(best)
    return bs, [best[b][0] for b in bs], [best[b][1] for b in bs]


def chosen_band(plan: dict) -> tuple[float, float] | None:
    """The chosen configuration's goodput band (plan-level ``goodput_band: [low, high]``), if it has a width."""
    pair = _pair(plan.get("goodput_band"))
    return pair if pair is not None and pair[1] > pair[0] else None


def goodput_figure(plan: dict):
    """goodput(B) over the feasible candidates, with the choice and the alternatives marked.

    The chosen batch is drawn last and on top, so it stays visible when it coincides with the base batch.
    """
    import matplotlib.pyplot as plt

    cands = plan["candidates"]
    bs = [c["global_batch"] for c in cands]
    fig, ax = plt.subplots(figsize=(6.4, 3.9))
    band = goodput_band(plan)
    if band is not None:
        ax.fill_between(band[0], band[1], band[2], color="tab:blue", alpha=0.18,
                        label="PREDICTED step-time band" if is_predicted(plan) else "goodput uncertainty band")
    ax.plot(bs, [c["goodput"] for c in cands], "o-", label="goodput = samples/s × efficiency")
    ax.plot(bs, [c["samples_per_s"] for c in cands], ":", color="gray", label="samples/s")
    alts = plan.get("alternatives", {})
    chosen = plan["global_batch"]
    if "base_batch" in alts:
        a = alts["base_batch"]
        same = a["global_batch"] == chosen
        ax.scatter([a["global_batch"]], [a["goodput"]], s=200 if same else 90, marker="D", facecolors="none",
                   edgecolors="tab:purple", linewidths=2, zorder=4,
                   label=f"base batch {a['global_batch']}" + (" (= chosen)" if same else ""))
    largest = largest_alternative(plan)
    if largest is not None:
        a, kind, label = largest
        ax.scatter([a["global_batch"]], [a["goodput"]], s=70, marker="X" if kind == "memory" else "P",
                   color="r" if kind == "memory" else "tab:brown", zorder=5, label=label)
    cb = chosen_band(plan)
    if cb is not None:
        ax.errorbar([chosen], [plan["goodput"]], yerr=[[plan["goodput"] - cb[0]], [cb[1] - plan["goodput"]]], fmt="none",
                    ecolor="g", elinewidth=1.5, capsize=5, zorder=5,
                    label=f"chosen's goodput band {cb[0]:.0f}–{cb[1]:.0f}")
    ax.scatter([chosen], [plan["goodput"]], s=230, marker="*", color="g", edgecolors="white", linewidths=0.8,
               zorder=6, label=f"chosen {chosen}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch")
    ax.set_ylabel("samples/s")
    ax.legend(fontsize=7.5, markerscale=0.8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside
    ax.set_title("Goodput (Pollux)")
    return fig


def worlds_figure(plan: dict):
    """Goodput at each world size, against perfect scaling from the smallest one."""
    import matplotlib.pyplot as plt

    rows = plan["worlds"]["table"]
    ws = [r["world_size"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(ws, [r["goodput"] for r in rows], "o-", label="best goodput at each world size")
    ax.plot(ws, [rows[0]["goodput"] * w / ws[0] for w in ws], "--", color="gray", label="perfect scaling")
    rec = plan["worlds"].get("recommended")
    hit = [r for r in rows if r["world_size"] == rec]
    if hit:
        ax.scatter([rec], [hit[0]["goodput"]], s=170, marker="*", color="g", zorder=5, label=f"recommended: {rec}")
    if len(ws) > 1 and ws[-1] / ws[0] >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ws, [str(w) for w in ws])
    ax.minorticks_off()
    ax.set_xlabel("world size (data-parallel ranks)")
    ax.set_ylabel("goodput (samples/s)")
    ax.set_title("Goodput across world sizes (communication included)")
    ax.legend(fontsize=8)
    return fig
