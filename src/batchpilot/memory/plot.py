"""The M(B) plot: traced points, the fitted curve, the device budget and the largest micro-batch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from batchpilot.memory.curve import MemoryCurve
from batchpilot.memory.devices import DeviceSpec

GiB = 2**30


def memory_figure(curve: MemoryCurve, device: DeviceSpec, title: str, extra: Sequence[tuple[str, MemoryCurve]] = ()):
    """A matplotlib figure of M(B) in GiB against the micro-batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = curve.max_micro_batch(device.usable_bytes)
    traced = sorted(curve.peak_bytes_at)
    hi = max([*traced, m, 1]) * 1.3
    log_x = hi / max(1, min(traced)) > 50
    xs = [hi ** (i / 200) for i in range(201)] if log_x else [1 + (hi - 1) * i / 200 for i in range(201)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(xs, [curve.peak_bytes(x) / GiB for x in xs], label="M(B) fit")
    ax.scatter(traced, [curve.peak_bytes_at[b] / GiB for b in traced], zorder=3, label=f"traced ({curve.method})")
    for name, other in extra:
        ax.plot(xs, [other.peak_bytes(x) / GiB for x in xs], linestyle="--", label=name)
    ax.axhline(device.usable_bytes / GiB, color="tab:red", linewidth=1, label=f"usable on {device.name}")
    ax.axhline(device.memory_bytes / GiB, color="tab:red", linewidth=1, linestyle=":", label="total")
    if m:
        ax.axvline(m, color="tab:green", linewidth=1, label=f"largest micro-batch {m}")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("micro-batch B")
    ax.set_ylabel("peak training-step memory (GiB)")
    ax.set_title(title)
    ax.set_ylim(0, max(curve.peak_bytes(hi), device.usable_bytes) / GiB * 1.1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_memory_plot(path: str | Path, curve: MemoryCurve, device: DeviceSpec, title: str,
                     extra: Sequence[tuple[str, MemoryCurve]] = ()) -> Path:
    """Write the M(B) plot as a PNG."""
    import matplotlib.pyplot as plt

    fig = memory_figure(curve, device, title, extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
