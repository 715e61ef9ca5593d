"""CPU kernel workspaces: memory a kernel allocates *inside* one aten op, invisible to a dispatch-level trace.

``MemTracker`` sees every tensor an op returns, but not the scratch buffers a CPU kernel
allocates and frees internally (oneDNN reorders of a convolution's input, gradient and
weight into blocked layouts, for example). For a CPU target we measure them: the first
time a convolution of a given shape signature is traced, the real op runs with 8 and 16
rows in its batched arguments under the profiler's allocator events, and the bytes it
allocated beyond its outputs are fitted as ``c + s * rows``. During the trace the op's
scratch is then charged as a fake tensor alive while the op runs.

For a CUDA target no workspace is charged here: cuDNN/cuBLAS workspaces belong to the
device's ``workspace_bytes`` allowance (:mod:`batchpilot.memory.devices`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from batchpilot.memory.quiet import native_stderr_silenced

aten = torch.ops.aten
# op -> positions of the arguments whose dim 0 is the batch.
BATCHED_ARGS: dict[Any, tuple[int, ...]] = {
    aten.convolution.default: (0,),
    aten.convolution_backward.default: (0, 1),
}
CALIBRATION_BATCHES = (8, 16)


def _op_extra_bytes(func: Any, args: tuple, kwargs: dict) -> int:
    """Run ``func`` for real and return the bytes it allocated beyond its outputs (its peak scratch)."""
    from torch.profiler import ProfilerActivity, profile

    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = func(*args, **kwargs)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    del out
    return max(0, peak - live)


class CpuKernelWorkspace(TorchDispatchMode):
    """A dispatch mode (entered inside ``MemTracker``) that charges measured CPU kernel scratch.

    The scratch is calibrated per (op, non-batch shapes, dtypes) at :data:`CALIBRATION_BATCHES`
    rows of the batched arguments (whatever their leading size is in the trace, e.g. B or B*s),
    so calibration never allocates the traced batch. A calibration that cannot run (for
    example under a user's own profiler) charges nothing and is recorded in ``failed``.
    """

    _cache: dict[tuple, tuple[float, float]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.charged: dict[str, int] = {}
        self.failed: list[str] = []

    @staticmethod
    def _signature(func: Any, args: tuple) -> tuple:
        batched = BATCHED_ARGS[func]

        def sig(i: int, a: Any) -> Any:
            if isinstance(a, torch.Tensor):
                shape = tuple(a.shape[1:]) if i in batched else tuple(a.shape)
                return ("T", shape, a.dtype, a.is_contiguous())
            if isinstance(a, (list, tuple)):
                return tuple(sig(-1, x) for x in a)
            return a

        return (str(func), tuple(sig(i, a) for i, a in enumerate(args)))

    def _workspace(self, func: Any, args: tuple, kwargs: dict) -> int:
        rows = [a.shape[0] for i, a in enumerate(args)
                if i in BATCHED_ARGS[func] and isinstance(a, torch.Tensor) and a.dim() > 0]
        if not rows or len(set(rows)) != 1:
            return 0
        key = self._signature(func, args)
        if key not in self._cache:
            try:
                points = []
                with _disable_current_modes():
                    for b in CALIBRATION_BATCHES:
                        points.append(_op_extra_bytes(func, self._real_args(func, args, b), dict(kwargs)))
            except Exception as exc:  # noqa: BLE001 - calibration is best effort
                self.failed.append(f"{func}: {type(exc).__name__}: {exc}")
                self._cache[key] = (0.0, 0.0)
            else:
                (b1, b2), (w1, w2) = CALIBRATION_BATCHES, points
                slope = max(0.0, (w2 - w1) / (b2 - b1))
                self._cache[key] = (max(0.0, w1 - slope * b1), slope)
        const, slope = self._cache[key]
        return int(math.ceil(const + slope * rows[0]))

    @staticmethod
    def _real_args(func: Any, args: tuple, rows: int) -> tuple:
        batched = BATCHED_ARGS[func]
        out = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                shape = list(a.shape)
                if i in batched and shape:
                    shape[0] = rows
                t = torch.randn(shape, dtype=a.dtype) if a.is_floating_point() else torch.zeros(shape, dtype=a.dtype)
                out.append(t)
            else:
                out.append(a)
        return tuple(out)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in BATCHED_ARGS:
            return func(*args, **kwargs)
        nbytes = self._workspace(func, args, kwargs)
        if nbytes <= 0:
            return func(*args, **kwargs)
        scratch = torch.empty(nbytes, dtype=torch.uint8)
        out = func(*args, **kwargs)
        del scratch
        name = str(func).split(".")[1] if "." in str(func) else str(func)
        self.charged[name] = max(self.charged.get(name, 0), nbytes)
        return out
