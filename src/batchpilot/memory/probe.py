"""An out-of-memory-safe probe of the largest micro-batch on a real device.

It starts from the traced prediction and confirms it with real training steps:
the predicted batch (expected to fit), then ``(1 + step_frac)`` times it (expected to
fail), and bisects only if that bracket is wider than ``tolerance``. With a good
prediction (true max within ``step_frac`` above it) that is 2-3 trials and one OOM.
With a bad one it shrinks by ``shrink`` (accelerate's ``find_executable_batch_size``
uses 0.9) or grows geometrically until it has a bracket, then bisects.

Every trial runs on the caller's model and optimizer and is undone: weights, buffers,
grads, optimizer state, train/eval flags and the RNG states are saved to host memory
first and written back bit for bit (:class:`TrainingState`). Batches come from
``make_batch(b)``, never from the caller's sampler, so the data order is untouched.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from batchpilot.errors import BatchpilotError
from batchpilot.memory.snapshot import TrainingState

if TYPE_CHECKING:
    from batchpilot.workloads import Workload

OOM_MESSAGES = (
    "out of memory",  # "CUDA out of memory.", "CUDA error: out of memory", "XPU out of memory"
    "can't allocate memory",  # DefaultCPUAllocator
    "CUDNN_STATUS_NOT_SUPPORTED",  # cuDNN's way of failing for lack of workspace
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
)
"""Allocator messages treated as out-of-memory (after accelerate's ``should_reduce_batch_size``)."""

MakeBatch = Callable[[int], "tuple[torch.Tensor, torch.Tensor]"]


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (``torch.OutOfMemoryError`` or an allocator message)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and len(exc.args) == 1 and any(m in str(exc.args[0]) for m in OOM_MESSAGES)


def free_memory() -> None:
    """Collect garbage and return cached device blocks after an OOM."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Trial:
    """One probed micro-batch: whether it fit, and the device peak when measurable."""

    micro_batch: int
    fits: bool
    peak_bytes: int | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of :func:`find_max_batch`.

    Attributes:
        max_micro_batch: the largest micro-batch that ran (0 when even the smallest tried failed).
        first_failing: the smallest micro-batch that ran out of memory (``None`` if none did).
        predicted_micro_batch: the starting point.
        trials: every trial in order.
    """

    max_micro_batch: int
    first_failing: int | None
    predicted_micro_batch: int
    trials: list[Trial] = field(default_factory=list)

    @property
    def oom_count(self) -> int:
        """Trials that ran out of memory."""
        return sum(not t.fits for t in self.trials)

    @property
    def prediction_ratio(self) -> float:
        """predicted / found (1.0 is perfect; below 1 is conservative)."""
        return self.predicted_micro_batch / self.max_micro_batch if self.max_micro_batch else math.inf


def _units(y: torch.Tensor) -> int:
    return max(1, y.numel())


def _trial_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], steps: int) -> None:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    for _ in range(steps):
        loss = loss_sum(model(x), y) / _units(y)
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def find_max_batch(model: nn.Module, optimizer: torch.optim.Optimizer, make_batch: MakeBatch,
                   loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, predicted: int,
                   upper: int | None = None, tolerance: float = 0.1, step_frac: float = 0.1, shrink: float = 0.9,
                   max_trials: int = 8) -> ProbeResult:
    """Find the largest micro-batch whose training step fits, starting from ``predicted``.

    Args:
        model: the model, already on its device.
        optimizer: its optimizer; a trial runs 2 steps when it has no state yet (state creation
            plus a steady-state step), else 1.
        make_batch: ``make_batch(b) -> (x, y)`` on the model's device.
        loss_sum: summed loss, divided by the number of target elements.
        predicted: the traced prediction (``MemoryCurve.max_micro_batch``), the first trial.
        upper: never try above this (e.g. the dataset size).
        tolerance: stop when ``first_failing <= max_ok * (1 + tolerance)``.
        step_frac: the first step up from a fitting prediction.
        shrink: the factor down from a failing one.
        max_trials: hard cap on trials.

    Returns:
        A :class:`ProbeResult`; the caller's model, optimizer, grads and RNG are as before.

    Raises:
        BatchpilotError: bad arguments. Errors other than OOM propagate (after restoring state).
    """
    if isinstance(predicted, bool) or not isinstance(predicted, int) or predicted < 1:
        raise BatchpilotError(f"predicted micro-batch must be a positive integer, got {predicted!r}")
    if upper is not None and upper < 1:
        raise BatchpilotError(f"upper must be >= 1, got {upper!r}")
    if not (0 < shrink < 1 and step_frac > 0 and tolerance >= 0 and max_trials >= 1):
        raise BatchpilotError("probe needs 0 < shrink < 1, step_frac > 0, tolerance >= 0, max_trials >= 1")
    cap = upper if upper is not None else 2**31 - 1
    saved = TrainingState.capture(model, optimizer)
    steps = 2 if not optimizer.state else 1
    trials: list[Trial] = []
    ok, bad = 0, None
    b = min(predicted, cap)
    cuda = torch.cuda.is_available() and any(p.is_cuda for p in model.parameters())
    try:
        while len(trials) < max_trials:
            start = time.perf_counter()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            fits = True
            try:
                x, y = make_batch(b)
                _trial_step(model, optimizer, x, y, loss_sum, steps)
                del x, y
            except Exception as exc:  # noqa: BLE001 - only OOM is caught; the rest re-raises below
                if not is_oom(exc):
                    raise
                fits = False
            finally:
                saved.restore(model, optimizer)
            if not fits:
                free_memory()  # the OOM's traceback held the trial's tensors
            peak = int(torch.cuda.max_memory_allocated()) if cuda and fits else None
            trials.append(Trial(b, fits, peak, time.perf_counter() - start))
            if fits:
                ok = max(ok, b)
            else:
                bad = b if bad is None else min(bad, b)
            b = _next_batch(ok, bad, cap, step_frac, shrink, len(trials))
            if b is None or (bad is not None and ok and bad <= math.floor(ok * (1 + tolerance)) + 1):
                break
    finally:
        saved.restore(model, optimizer)
    return ProbeResult(max_micro_batch=ok, first_failing=bad, predicted_micro_batch=predicted, trials=trials)


def _next_batch(ok: int, bad: int | None, cap: int, step_frac: float, shrink: float, n: int) -> int | None:
    if bad is not None and ok:
        mid = (ok + bad) // 2
        return mid if ok < mid < bad else None
    if bad is None:  # everything fitted so far: grow, faster after each success
        if ok >= cap:
            return None
        return min(cap, max(ok + 1, math.ceil(ok * (1 + step_frac * 2 ** (n - 1)))))
    nxt = math.floor(bad * shrink)  # nothing fitted yet: shrink
    return nxt if nxt >= 1 and nxt < bad else (None if bad <= 1 else bad - 1)


def probe_workload(workload: "Workload", predicted: int, *, device: str = "cuda", dtype: str = "float32",
                   amp: bool = False, checkpointing: bool = False, **kwargs: object) -> ProbeResult:
    """Probe a workload on a real device with its own fresh model and optimizer (``batchpilot memory --probe``).

    Batches are the first ``b`` training items (wrapping around), so no sampler is involved.

    Raises:
        BatchpilotError: no such device.
    """
    from batchpilot.memory.options import apply_checkpointing, torch_dtype

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BatchpilotError("--probe runs real steps and needs a CUDA device; none is visible here "
                              "(the traced prediction above does not need one)")
    param_dtype = torch_dtype(dtype)
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        model = workload.make_model().to(dev)
        if not amp and param_dtype != torch.float32:
            model = model.to(param_dtype)
        if checkpointing:
            apply_checkpointing(model)
        optimizer = workload.make_optimizer(model.parameters(), workload.base_lr)
    n = workload.num_train

    def make_batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = [workload.train_data[i % n] for i in range(b)]
        x = torch.stack([t[0] for t in items]).to(dev)
        y = torch.stack([t[1] for t in items]).to(dev)
        return (x.to(param_dtype) if x.is_floating_point() and not amp else x), y

    loss_sum = workload.loss_sum
    if amp:
        low = torch.bfloat16 if dtype == "float32" else param_dtype

        def loss_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: F811 - autocast wrapper
            return workload.loss_sum(out.float(), y)

        inner_forward = model.forward

        def forward(*a: object, **k: object) -> torch.Tensor:
            with torch.autocast(device_type=dev.type, dtype=low):
                return inner_forward(*a, **k)

        model.forward = forward  # type: ignore[method-assign]
    return find_max_batch(model, optimizer, make_batch, loss_sum, predicted=max(1, predicted), **kwargs)  # type: ignore[arg-type]
