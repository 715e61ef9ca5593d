"""The M(B) plot: traced points, the fitted curve, the device budget and the largest micro-batch.

Both axes are logarithmic when the batches span a wide range, so the traced points (often a few MiB)
stay visible next to a device budget of tens of GiB. The curve is solid over the traced batches and
dashed, on a shaded background, where it is extrapolated past the largest traced batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from batchpilot.files import atomic_write_with
from batchpilot.memory.curve import MemoryCurve
from batchpilot.memory.devices import DeviceSpec

GiB = 2**30


def _short_bytes(x: float) -> str:
    """Axis label: ``512 KiB``, ``4 MiB``, ``1.5 GiB``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.3g} B"


def memory_figure(curve: MemoryCurve, device: DeviceSpec, title: str, extra: Sequence[tuple[str, MemoryCurve]] = ()):
    """A matplotlib figure of M(B) (bytes, log scale) against the micro-batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    m = curve.max_micro_batch(device.usable_bytes)
    traced = sorted(curve.peak_bytes_at)
    lo = max(1, min(traced)) if traced else 1
    last = max(traced) if traced else 1
    hi = max([*traced, m, 1]) * 1.3
    log_x = hi / lo > 50
    n = 240
    xs = [lo * (hi / lo) ** (i / n) for i in range(n + 1)] if log_x else [lo + (hi - lo) * i / n for i in range(n + 1)]
    inside = [x for x in xs if x <= last] + [last]
    beyond = [last] + [x for x in xs if x > last]
    fig, ax = plt.subplots(figsize=(9.2, 4.2))
    line, = ax.plot(inside, [curve.peak_bytes(x) for x in inside], label="M(B): through the traced points")
    if len(beyond) > 1:
        ax.plot(beyond, [curve.peak_bytes(x) for x in beyond], linestyle="--", color=line.get_color(),
                label=f"extrapolated past B={last} (largest traced)")
        ax.axvspan(last, hi, color="0.9", zorder=0)
    ax.scatter(traced, [curve.peak_bytes_at[b] for b in traced], zorder=3, color="k", s=22,
               label=f"traced ({curve.method})")
    for name, other in extra:
        ax.plot(xs, [other.peak_bytes(x) for x in xs], linestyle="-.", linewidth=1, label=name)
    ax.axhline(device.usable_bytes, color="tab:red", linewidth=1, label=f"usable on {device.name}")
    ax.axhline(device.memory_bytes, color="tab:red", linewidth=1, linestyle=":", label="total")
    if m:
        ax.axvline(m, color="tab:green", linewidth=1, label=f"largest micro-batch {m}")
    if log_x:
        ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_locator(LogLocator(base=2, numticks=9))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _short_bytes(v)))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo * (0.8 if log_x else 1), hi)
    bottom = min([curve.peak_bytes(lo), *(curve.peak_bytes_at.values())]) / 1.6
    top = max(curve.peak_bytes(hi), device.memory_bytes) * 1.6
    ax.set_ylim(bottom, top)
    ax.set_xlabel("micro-batch B")
    ax.set_ylabel("peak training-step memory")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside: no curve hidden
    fig.tight_layout()
    return fig


def save_memory_plot(path: str | Path, curve: MemoryCurve, device: DeviceSpec, title: str,
                     extra: Sequence[tuple[str, MemoryCurve]] = ()) -> Path:
    """Write the M(B) plot as a PNG."""
    import matplotlib.pyplot as plt

    fig = memory_figure(curve, device, title, extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_with(path, lambda fh: fig.savefig(fh, format=path.suffix.lstrip(".") or "png", dpi=110,
                                                       bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path
