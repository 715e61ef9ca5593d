"""Per-micro-batch gradient norms inside someone else's training loop, for the noise scale.

Lightning and the Hugging Face Trainer accumulate gradients in ``p.grad`` and, between the last
backward pass and ``optimizer.step()``, may clip them (HF clips *before* its
``on_pre_optimizer_step`` callback) or unscale them (AMP). Reading ``p.grad`` from a callback at
the optimizer step is therefore too late. :class:`MicroBatchGradients` instead registers a
``post_accumulate_grad_hook`` on every trainable parameter: the hook runs inside each backward
pass, right after the new gradient was added to ``p.grad``, and keeps a private copy of it. The
difference of consecutive copies is the micro-batch's contribution ``Δ_i``; the last copy is the
accumulated gradient before any clipping. Nothing is written to ``p.grad``.

A framework weights micro-batch ``i`` by ``c_i`` (its loss is ``c_i`` x the micro-batch mean):
Lightning uses ``c_i = 1/accumulate_grad_batches``; the HF Trainer ``1/k`` or ``n_i/N`` (its
``num_items_in_batch``). Then ``Δ_i = c_i G_i`` with ``G_i`` the mean gradient over the ``b_i``
units of micro-batch ``i``, and the accumulated ``g = Σ c_i G_i`` satisfies
``E|g/Σc|² = |G|² + tr(Σ)/B_eff`` with ``B_eff = (Σc)² / Σ(c_i²/b_i)`` (``= Σ b_i`` for
``c_i ∝ b_i``, ``= k·b`` for equal micro-batches). These are the two batch sizes of McCandlish
et al. 2018 (Appendix A), fed to :meth:`batchpilot.noise.microbatch.GradientNoiseScale.update`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Iterable, Sequence

import torch
from torch import nn

from batchpilot.noise.microbatch import GradientNoiseScale


class MicroBatchGradients:
    """Record ``|Δ_i|²`` per micro-batch with parameter hooks and turn each step into a noise update.

    Call order per optimizer step: :meth:`start_step`, then for each micro-batch its backward pass
    followed by :meth:`end_micro`, then :meth:`end_step` with the micro-batches' unit counts and
    loss weights. Costs one extra copy of the gradients in memory while installed.

    Args:
        monitor: receives one ``update`` per recorded step.
    """

    def __init__(self, monitor: GradientNoiseScale) -> None:
        self.monitor = monitor
        self.skipped_steps = 0
        """Steps that could not be used: non-finite gradients (AMP overflow) or a count mismatch."""
        self._handles: list = []
        self._prev: list[torch.Tensor | None] = []
        self._stamp: list[int] = []
        self._step_id = 0
        self._active = False
        self._acc: list[torch.Tensor] = []
        self._micro_sq: list[float] = []
        self._scale = 1.0

    # -- hooks ------------------------------------------------------------------------------
    def install(self, params: Iterable[nn.Parameter]) -> None:
        """Hook every parameter that requires a gradient (replaces earlier hooks)."""
        self.remove()
        params = [p for p in params if p.requires_grad]
        self._prev, self._stamp = [None] * len(params), [-1] * len(params)
        self._handles = [p.register_post_accumulate_grad_hook(partial(self._hook, i)) for i, p in enumerate(params)]

    def remove(self) -> None:
        """Remove the hooks and free the gradient copies."""
        for h in self._handles:
            h.remove()
        self._handles, self._prev, self._stamp, self._active = [], [], [], False

    @property
    def installed(self) -> bool:
        """Whether hooks are in place."""
        return bool(self._handles)

    @torch.no_grad()
    def _hook(self, i: int, p: torch.Tensor) -> None:
        if not self._active or p.grad is None:
            return
        g, prev = p.grad, self._prev[i]
        if self._stamp[i] != self._step_id:
            # first gradient of this parameter in the step: the framework zeroed it before, so Δ = g
            self._acc.append(_sq(g))
            if prev is None or prev.shape != g.shape or prev.dtype != g.dtype or prev.device != g.device:
                self._prev[i] = g.detach().clone()
            else:
                prev.copy_(g)
            self._stamp[i] = self._step_id
        else:
            prev.sub_(g)  # prev - now = -Δ, in our own buffer
            self._acc.append(_sq(prev))
            prev.copy_(g)

    # -- step protocol ----------------------------------------------------------------------
    def start_step(self, active: bool = True) -> None:
        """Begin an optimizer step; ``active=False`` records nothing (and costs nothing) for it."""
        self._step_id += 1
        self._active = active and self.installed
        self._acc, self._micro_sq, self._scale = [], [], 1.0

    @property
    def recording(self) -> bool:
        """Whether the current step is being recorded."""
        return self._active

    @property
    def micro_batches(self) -> int:
        """Micro-batches recorded in the current step."""
        return len(self._micro_sq)

    def end_micro(self, grad_scale: float = 1.0) -> None:
        """Close the current micro-batch; ``grad_scale`` is the AMP loss scale its backward used."""
        if not self._active:
            return
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in self._acc:
            by_device.setdefault(t.device, []).append(t)
        total = sum(float(torch.stack(ts).sum()) for ts in by_device.values())
        self._acc = []
        self._micro_sq.append(total / grad_scale**2)
        self._scale = grad_scale

    def end_step(self, units: Sequence[float], weights: Sequence[float]) -> tuple[float, float] | None:
        """Finish the step: one ``(g_sq, trace_sigma)`` update of the monitor, or ``None``.

        Args:
            units: units (samples or tokens) of each recorded micro-batch, in order.
            weights: the loss weight ``c_i`` of each micro-batch (any common factor cancels).

        Returns:
            The step's estimate, or ``None`` when the step was not recorded, had fewer than two
            micro-batches, non-finite gradients, or counts that do not match the micro-batches.
        """
        sq, active = self._micro_sq, self._active
        self._micro_sq, self._active = [], False
        if not active or len(sq) < 2:
            return None
        if len(units) != len(sq) or len(weights) != len(sq) or any(b <= 0 for b in units) or any(c <= 0 for c in weights):
            self.skipped_steps += 1
            return None
        touched = [p for p, s in zip(self._prev, self._stamp) if s == self._step_id and p is not None]
        big_sq = grad_sq_norm_of(touched) / self._scale**2
        total_c = float(sum(weights))
        small = [s / (c * c) for s, c in zip(sq, weights)]
        big = big_sq / (total_c * total_c)
        big_batch = total_c**2 / sum(c * c / b for c, b in zip(weights, units))
        if not all(math.isfinite(x) for x in (*small, big, big_batch)):
            self.skipped_steps += 1
            return None
        nearest = round(big_batch)
        if abs(big_batch - nearest) <= 1e-9 * big_batch:
            big_batch = nearest  # equal micro-batches: exactly k·b
        return self.monitor.update(small, big, [int(b) for b in units], big_batch)


def grad_sq_norm_of(tensors: Sequence[torch.Tensor]) -> float:
    """Σ |t|² in float64 over plain tensors (the recorded gradient copies), one sync per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(_sq(t))
    return sum(float(torch.stack(ts).sum()) for ts in by_device.values())


def _sq(t: torch.Tensor) -> torch.Tensor:
    """|t|² as a float64 0-dim tensor; the norm runs in the tensor's own precision (float32 for 16-bit types)."""
    low = t.dtype in (torch.float16, torch.bfloat16)
    return torch.linalg.vector_norm(t, dtype=torch.float32 if low else None).double().square()
