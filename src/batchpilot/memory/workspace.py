"""CPU kernel workspaces: memory a kernel allocates *inside* one aten op, invisible to a dispatch-level trace.

``MemTracker`` sees every tensor an op returns, but not the scratch buffers a CPU kernel
allocates and frees internally (oneDNN reorders of a convolution's input, gradient and
weight into blocked layouts, for example). For a CPU target we measure them: the first
time a convolution of a given shape signature is traced, the real op runs at micro-batches
8 and 16 under the profiler's allocator events, and the bytes it allocated beyond its
outputs are fitted as ``c + s * B``. During the trace the op's workspace is then charged
as a fake scratch tensor alive while the op runs.

For a CUDA target no workspace is charged here: cuDNN/cuBLAS workspaces belong to the
device's ``workspace_bytes`` allowance (:mod:`batchpilot.memory.devices`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_map

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

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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

    Args:
        batch: the traced micro-batch (the dim-0 size of the batched arguments).
    """

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch
        self.charged: dict[str, int] = {}

    _cache: dict[tuple, tuple[float, float]] = {}

    def _signature(self, func: Any, args: tuple) -> tuple:
        def sig(a: Any) -> Any:
            if isinstance(a, torch.Tensor):
                return ("T", tuple(a.shape[1:]), a.shape[0] == self.batch, a.dtype, a.is_contiguous())
            if isinstance(a, (list, tuple)):
                return tuple(sig(x) for x in a)
            return a

        return (str(func), tuple(sig(a) for a in args))

    def _workspace(self, func: Any, args: tuple, kwargs: dict) -> int:
        key = self._signature(func, args)
        if key not in self._cache:
            points = []
            with _disable_current_modes():
                for b in CALIBRATION_BATCHES:
                    real_args = self._real_args(func, args, b)
                    real_kwargs = tree_map(lambda a: a, kwargs)
                    points.append(_op_extra_bytes(func, real_args, real_kwargs))
            (b1, b2), (w1, w2) = CALIBRATION_BATCHES, points
            slope = max(0.0, (w2 - w1) / (b2 - b1))
            self._cache[key] = (max(0.0, w1 - slope * b1), slope)
        const, slope = self._cache[key]
        return int(math.ceil(const + slope * self.batch))

    def _real_args(self, func: Any, args: tuple, batch: int) -> tuple:
        batched = BATCHED_ARGS[func]
        out = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                shape = list(a.shape)
                if i in batched and shape and shape[0] == self.batch:
                    shape[0] = batch
                t = torch.randn(shape, dtype=a.dtype) if a.is_floating_point() else torch.zeros(shape, dtype=a.dtype)
                out.append(t.requires_grad_(False))
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
