"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, "Large Batch Training of
Convolutional Networks", Algorithm 1).

For each layer (parameter tensor) ``l`` with weights ``w``, gradient ``g``, weight decay ``β``,
trust coefficient ``η``, momentum ``m`` and global LR ``γ``::

    λ = ||w|| / (||g|| + β ||w||)                       # the local LR
    v ← m v + γ η λ (g + β w)                           # the LR sits inside the momentum, as in the paper
    w ← w − v

When ``||w||`` or ``||g||`` is zero the trust ratio ``η λ`` is 1 (plain momentum SGD for that tensor),
as in the common implementations. A param group with ``adapt=False`` skips the trust ratio (the
usual practice for biases and normalisation weights; see :func:`exclude_bias_and_norm`).

The gradient is read, never written: ``p.grad`` is the same after :meth:`LARS.step` as before it
(a gradient-noise monitor reads it).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from batchpilot.errors import BatchpilotError


class LARS(Optimizer):
    """Momentum SGD with a layer-wise trust ratio (You et al. 2017).

    Args:
        params: parameters or param groups (a group may set ``adapt=False``).
        lr: the global LR ``γ`` (the paper's polynomial decay is left to the scheduler).
        momentum: ``m``.
        weight_decay: ``β``, added to the gradient inside the trust ratio.
        trust_coefficient: ``η`` (0.001 in the paper).
        adapt: apply the trust ratio (default for all groups).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        adapt: bool = True,
    ) -> None:
        if not lr >= 0:
            raise BatchpilotError(f"LARS lr must be >= 0, got {lr!r}")
        if not 0 <= momentum < 1:
            raise BatchpilotError(f"LARS momentum must be in [0, 1), got {momentum!r}")
        if not weight_decay >= 0:
            raise BatchpilotError(f"LARS weight decay must be >= 0, got {weight_decay!r}")
        if not trust_coefficient > 0:
            raise BatchpilotError(f"LARS trust coefficient must be > 0, got {trust_coefficient!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, adapt=adapt)
        super().__init__(params, defaults)

    @staticmethod
    def trust_ratio(w: torch.Tensor, g: torch.Tensor, weight_decay: float, trust_coefficient: float) -> torch.Tensor:
        """``η ||w|| / (||g|| + β ||w||)``, or 1 when either norm is zero (a 0-dim tensor)."""
        w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
        ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm)
        one = torch.ones_like(ratio)
        return torch.where((w_norm > 0) & (g_norm > 0), ratio, one)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One update; ``closure`` re-evaluates the loss as in ``torch.optim``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise BatchpilotError("LARS does not support sparse gradients")
                d = p.grad.add(p, alpha=wd) if wd != 0 else p.grad.clone()  # a new tensor: p.grad is untouched
                if group["adapt"]:
                    d.mul_(self.trust_ratio(p, p.grad, wd, group["trust_coefficient"]))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.mul_(m).add_(d, alpha=lr)
                p.sub_(buf)
        return loss


def exclude_bias_and_norm(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two param groups: weights (decayed, trust ratio) and 1-D tensors (biases, norm scales: neither).

    This is the practice of large-batch ResNet training with LARS (e.g. Goyal et al. 2017 for weight
    decay; the MLPerf LARS reference for both); the paper's Algorithm 1 itself adapts every layer.
    """
    decay, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (plain if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0, "adapt": False})
    return groups
