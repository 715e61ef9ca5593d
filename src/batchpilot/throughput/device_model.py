"""The device side of the step-time prediction: a GPU's (or this CPU's) peak FLOP/s, memory bandwidth and
the cost model's efficiency assumptions (:class:`GpuModel`), looked up by device name.

Used by :mod:`batchpilot.throughput.predict`; the figures are datasheet values, not measurements (see
docs/gpu.md), except :func:`cpu_model`, which measures this CPU.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from batchpilot.throughput.peak_flops import gpu_peak_flops

MATMUL_EFFICIENCY = 0.5
"""Share of the datasheet peak that matmul, convolution and attention kernels reach (an MFU-like assumption;
large-model training reports 40-60% on A100/H100, small shapes less)."""
BANDWIDTH_EFFICIENCY = 0.7
"""Share of the datasheet memory bandwidth that elementwise, normalisation and optimizer kernels reach."""
LAUNCH_S = 8e-6
"""Host time per kernel of an eager PyTorch step (dispatch plus CUDA launch): the floor of a small model's step."""
SOURCE_BANDWIDTH = "NVIDIA datasheets (H200, H100 SXM5/PCIe, A100 40/80GB SXM, V100 SXM2, T4, L4, RTX 4090/3090)"

# Peak memory bandwidth, bytes/s, by the device-table name (batchpilot.memory.devices).
GPU_BANDWIDTH: dict[str, float] = {
    "H200": 4.8e12,
    "H100": 3.35e12,
    "H100-PCIE": 2.0e12,
    "A100-80GB": 2.039e12,
    "A100-40GB": 1.555e12,
    "L4": 0.3e12,
    "V100-32GB": 0.9e12,
    "V100-16GB": 0.9e12,
    "T4": 0.32e12,
    "RTX 4090": 1.008e12,
    "RTX 3090": 0.936e12,
}


@dataclass(frozen=True)
class GpuModel:
    """What the prediction assumes about a device.

    Attributes:
        name: the device-table name (``H100``).
        peak_flops: dense peak FLOP/s by compute class: ``fp32``, ``tf32``, ``half`` (bf16/fp16 tensor cores).
        bandwidth: peak memory bandwidth, bytes/s.
        matmul_efficiency, bandwidth_efficiency, launch_s: the cost model's assumptions (module constants by default).
        asynchronous: the host launches kernels while the device runs (a GPU); a CPU runs each op in turn.
        source: where the figures come from.
    """

    name: str
    peak_flops: dict[str, float]
    bandwidth: float
    matmul_efficiency: float = MATMUL_EFFICIENCY
    bandwidth_efficiency: float = BANDWIDTH_EFFICIENCY
    launch_s: float = LAUNCH_S
    asynchronous: bool = True
    source: str = ""

    def describe(self) -> str:
        """One line: the assumptions."""
        return (f"{self.name}: peak {self.peak_flops['fp32'] / 1e12:.1f}/{self.peak_flops['tf32'] / 1e12:.1f}/"
                f"{self.peak_flops['half'] / 1e12:.1f} TFLOP/s fp32/tf32/bf16 x {self.matmul_efficiency:.0%}, "
                f"{self.bandwidth / 1e12:.2f} TB/s x {self.bandwidth_efficiency:.0%}, "
                f"{self.launch_s * 1e6:.0f} us per kernel")


def _table_key(name: str) -> str | None:
    """The device-table name for ``name`` (``H100``, ``"a100-80gb"``, ``"NVIDIA H100 80GB HBM3"`` ...)."""
    from batchpilot.memory.devices import GPU_TABLE_MIB, _ALIASES

    upper = name.strip().upper().replace("NVIDIA ", "").replace("GEFORCE ", "")
    for table in (GPU_BANDWIDTH, _ALIASES, GPU_TABLE_MIB):
        for key in table:
            if upper == key.upper():
                key = _ALIASES.get(key, key)
                return key if key in GPU_BANDWIDTH else None
    variants = {"H100": "H100-PCIE" if "PCIE" in upper else "H100",  # a CUDA device name: "H100 80GB HBM3"
                "A100": "A100-40GB" if "40GB" in upper else "A100-80GB",
                "V100": "V100-32GB" if "32GB" in upper else "V100-16GB"}
    for base in sorted({k.split("-")[0] for k in GPU_BANDWIDTH}, key=len, reverse=True):
        if re.search(rf"(?<![A-Z0-9]){re.escape(base)}(?![A-Z0-9])", upper):
            return variants.get(base, base)
    return None


def gpu_model(name: str, **overrides: Any) -> GpuModel | None:
    """The cost model's view of a GPU by name, or ``None`` when its peak or bandwidth is not tabled."""
    key = _table_key(name)
    if key is None:
        return None
    lookup = key.replace("-", " ")
    fp32 = gpu_peak_flops(lookup, "float32", tf32=False)
    tf32 = gpu_peak_flops(lookup, "float32", tf32=True)
    half = gpu_peak_flops(lookup, "bfloat16")
    if fp32 is None or tf32 is None or half is None:
        return None
    return GpuModel(name=key, peak_flops={"fp32": fp32.flops_per_s, "tf32": tf32.flops_per_s, "half": half.flops_per_s},
                    bandwidth=GPU_BANDWIDTH[key], source=f"{half.source.split(',')[0]} (peak), {SOURCE_BANDWIDTH} "
                                                          "(bandwidth)", **overrides)


def predictable_gpus() -> list[str]:
    """Device-table names the cost model covers."""
    return [k for k in GPU_BANDWIDTH if gpu_model(k) is not None]


_CPU_BW_CACHE: dict[int, float] = {}


def cpu_model(*, launch_s: float = 10e-6) -> GpuModel:
    """This CPU through the same cost model (measured peak matmul FLOP/s and copy bandwidth, synchronous ops):
    for checking the model's structure against CPU measurements, not for planning."""
    from batchpilot.throughput.peak_flops import cpu_peak_flops

    threads = torch.get_num_threads()
    if threads not in _CPU_BW_CACHE:
        a = torch.ones(16 * 2**20 // 4)  # 16 MiB, beyond most caches
        b = torch.empty_like(a)
        b.copy_(a)
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            b.copy_(a)
            best = min(best, time.perf_counter() - t0)
        _CPU_BW_CACHE[threads] = 2 * a.numel() * 4 / best
    fp32 = cpu_peak_flops("float32").flops_per_s
    return GpuModel(name="cpu", peak_flops={"fp32": fp32, "tf32": fp32, "half": fp32}, bandwidth=_CPU_BW_CACHE[threads],
                    matmul_efficiency=1.0, bandwidth_efficiency=1.0, launch_s=launch_s, asynchronous=False,
                    source="measured here: matmul FLOP/s and a 16 MiB copy")


# ---------------------------------------------------------------- the op trace
