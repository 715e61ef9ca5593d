"""Mixed precision (``--amp bf16|fp16``): autocast for the forward and the loss, loss scaling for fp16.

Automatic mixed precision keeps fp32 weights and optimizer state and runs matmuls and convolutions in a
16-bit type under ``torch.autocast`` (Micikevicius et al. 2018, "Mixed precision training", ICLR). The
backward runs outside the autocast region (PyTorch's AMP recipe). fp16's narrow exponent underflows small
gradients, so fp16 needs loss scaling: a ``torch.amp.GradScaler`` multiplies the loss before the backward,
unscales the gradients before clipping, and skips steps whose gradients overflowed. bf16 has fp32's exponent
range and needs none (Kalamkar et al. 2019, "A study of BFLOAT16 for deep learning training").

Where it runs: bf16 autocast works on CPUs and GPUs. fp16 is refused on a CPU (``torch.autocast("cpu",
float16)`` exists but CPU fp16 matmuls are slow emulations, and the trainer's loss scaling is a CUDA
feature): :func:`amp_policy` says to use bf16 there.

Throughput and MFU under AMP are reported against the half-precision tensor-core peak
(:func:`batchpilot.throughput.peak_flops.gpu_peak_flops` with ``bfloat16``), not the fp32 one
(Chowdhery et al. 2022, "PaLM", App. B: MFU against the peak of the precision used).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from batchpilot.errors import BatchpilotError

AMP_DTYPES = ("bfloat16", "float16")
ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16"}
SHORT = {"bfloat16": "bf16", "float16": "fp16"}


def parse_amp(text: str | None) -> str | None:
    """``bf16``/``bfloat16`` -> ``bfloat16``, ``fp16``/``float16`` -> ``float16``; ``None``/``no``/``off`` -> ``None``.

    Raises:
        BatchpilotError: anything else.
    """
    if text is None:
        return None
    key = str(text).strip().lower()
    if key in ("", "no", "off", "none", "fp32", "float32"):
        return None
    if key not in ALIASES:
        raise BatchpilotError(f"--amp must be bf16 or fp16, got {text!r}")
    return ALIASES[key]


@dataclass(frozen=True)
class AmpPolicy:
    """How one device runs mixed precision.

    Attributes:
        dtype: ``bfloat16`` or ``float16`` (the autocast type; weights stay fp32).
        device_type: ``cpu`` or ``cuda``.
    """

    dtype: str
    device_type: str

    def __post_init__(self) -> None:
        if self.dtype not in AMP_DTYPES:
            raise BatchpilotError(f"amp dtype must be one of {', '.join(AMP_DTYPES)}, got {self.dtype!r}")
        if self.device_type not in ("cpu", "cuda"):
            raise BatchpilotError(f"amp device type must be cpu or cuda, got {self.device_type!r}")

    @property
    def short(self) -> str:
        """``bf16`` or ``fp16``."""
        return SHORT[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast region for the forward and the loss."""
        return torch.autocast(device_type=self.device_type, dtype=getattr(torch, self.dtype))

    @property
    def needs_scaler(self) -> bool:
        """fp16 needs loss scaling; bf16 does not."""
        return self.dtype == "float16"

    def make_scaler(self) -> Any:
        """A ``torch.amp.GradScaler`` for fp16, else ``None``."""
        return torch.amp.GradScaler(self.device_type) if self.needs_scaler else None


def amp_policy(amp: str | None, device: str | torch.device = "cpu", *, allow_cpu_fp16: bool = False) -> AmpPolicy | None:
    """The policy for ``amp`` on ``device`` (``None``: fp32, no autocast).

    Raises:
        BatchpilotError: an unknown type, or fp16 on a CPU (use bf16 there).
    """
    dtype = parse_amp(amp)
    if dtype is None:
        return None
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise BatchpilotError(f"--amp runs on cpu or cuda, got device {str(device)!r}")
    if dtype == "float16" and kind == "cpu" and not allow_cpu_fp16:
        raise BatchpilotError("--amp fp16 needs a CUDA device (fp16 loss scaling with a GradScaler); this runs on the "
                              "CPU: use --amp bf16, which needs no loss scaling")
    return AmpPolicy(dtype=dtype, device_type=kind)


def autocast_or_null(policy: AmpPolicy | None) -> contextlib.AbstractContextManager:
    """``policy.autocast()``, or a no-op without a policy."""
    return policy.autocast() if policy is not None else contextlib.nullcontext()


def peak_dtype(amp: str | None, dtype: str = "float32") -> str:
    """The dtype whose peak FLOP/s MFU is measured against: the autocast type under AMP, else ``dtype``."""
    return parse_amp(amp) or dtype


__all__ = ["AMP_DTYPES", "AmpPolicy", "amp_policy", "autocast_or_null", "parse_amp", "peak_dtype"]
