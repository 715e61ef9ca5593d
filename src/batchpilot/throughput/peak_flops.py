"""Peak FLOP/s of a device, for MFU: a datasheet table for GPUs, a matmul microbenchmark for CPUs."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import torch

# Dense (no structured sparsity) peak TFLOP/s: (fp32, tf32, bf16/fp16 tensor cores).
# Sources, NVIDIA datasheets: H100 Tensor Core GPU datasheet (SXM5 column; PCIe column for "H100 PCIE"),
# H200 Tensor Core GPU datasheet, A100 Tensor Core GPU datasheet, V100 Tensor Core GPU datasheet (SXM2),
# T4 datasheet, L4 datasheet, A10 datasheet, NVIDIA Ada Lovelace GPU architecture whitepaper (RTX 4090,
# FP16 tensor with FP32 accumulate) and NVIDIA Ampere GA102 whitepaper (RTX 3090, same). Sparsity
# figures on the datasheets are twice these and are not reachable by dense training.
GPU_PEAK_TFLOPS: dict[str, tuple[float, float, float]] = {
    "H200": (67.0, 494.7, 989.4),
    "H100 PCIE": (51.0, 378.0, 756.0),
    "H100": (67.0, 494.7, 989.4),
    "A100": (19.5, 156.0, 312.0),
    "A10": (31.2, 62.5, 125.0),
    "L4": (30.3, 60.0, 121.0),
    "V100": (15.7, 15.7, 125.0),
    "T4": (8.1, 8.1, 65.0),
    "RTX 4090": (82.6, 82.6, 165.2),
    "RTX 3090": (35.6, 35.6, 71.0),
}



@dataclass(frozen=True)
class PeakFlops:
    """A device's peak FLOP/s and where the number comes from."""

    flops_per_s: float
    source: str


def gpu_peak_flops(device_name: str, dtype: str = "float32", *, tf32: bool | None = None) -> PeakFlops | None:
    """The datasheet peak for a GPU name (``None`` when the GPU is not in :data:`GPU_PEAK_TFLOPS`).

    ``float32`` uses TF32 tensor cores only when torch allows it (``tf32=None`` reads
    ``torch.backends.cuda.matmul.allow_tf32``).
    """
    name = device_name.upper().replace("NVIDIA ", "").replace("GEFORCE ", "")
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIE" before "H100"
        if re.search(rf"(?<![A-Z0-9]){re.escape(key)}(?![A-Z0-9])", name):  # "L4" must not match "L40S"
            fp32, tf, half = GPU_PEAK_TFLOPS[key]
            if dtype in ("bfloat16", "float16"):
                value, kind = half, "bf16/fp16 tensor"
            elif tf32 if tf32 is not None else torch.backends.cuda.matmul.allow_tf32:
                value, kind = tf, "tf32 tensor"
            else:
                value, kind = fp32, "fp32"
            return PeakFlops(value * 1e12, f"NVIDIA {key} datasheet, dense {kind}")
    return None


_CPU_PEAK_CACHE: dict[tuple[int, str], PeakFlops] = {}


def cpu_peak_flops(dtype: str = "float32", *, size: int = 1024, repeats: int = 5) -> PeakFlops:
    """Measure this CPU's matmul FLOP/s at the current thread count (best of ``repeats``; cached).

    Uses a private generator, so the global RNG is untouched. On a machine shared with other
    jobs the figure is what this process can get, which is also what training gets.
    """
    key = (torch.get_num_threads(), dtype)
    if key not in _CPU_PEAK_CACHE:
        gen = torch.Generator().manual_seed(0)
        tdtype = getattr(torch, dtype)
        a = torch.randn(size, size, generator=gen).to(tdtype)
        b = torch.randn(size, size, generator=gen).to(tdtype)
        torch.mm(a, b)
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        _CPU_PEAK_CACHE[key] = PeakFlops(2 * size**3 / best,
                                         f"measured: {size}x{size} {dtype} matmul, {key[0]} threads, best of {repeats}")
    return _CPU_PEAK_CACHE[key]
