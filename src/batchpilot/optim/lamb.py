"""LAMB: layer-wise adaptive moments for large batches (You et al. 2019, "Large Batch Optimization
for Deep Learning: Training BERT in 76 Minutes", Algorithm 2).

For each layer (parameter tensor) with weights ``x`` and gradient ``g`` at step ``t``::

    m ← β1 m + (1 − β1) g
    v ← β2 v + (1 − β2) g²
    m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t)             # bias correction (``bias_correction=True``)
    r = m̂ / (sqrt(v̂) + ε)
    u = r + λ x                                           # decoupled weight decay λ
    x ← x − η · φ(||x||) / ||u|| · u

with ``φ`` the identity, or ``φ(z) = min(max(z, γ_l), γ_u)`` when ``clamp=(γ_l, γ_u)`` is given.
When ``φ(||x||)`` or ``||u||`` is zero the trust ratio is 1 (an Adam-W step for that tensor).

The gradient is read, never written: ``p.grad`` is unchanged by :meth:`LAMB.step`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.optim import Optimizer

from batchpilot.errors import BatchpilotError


class LAMB(Optimizer):
    """Adam moments with a layer-wise trust ratio (You et al. 2019).

    Args:
        params: parameters or param groups.
        lr: ``η``.
        betas: ``(β1, β2)``.
        eps: ``ε`` (1e-6 in the paper's experiments).
        weight_decay: ``λ`` (decoupled; 0.01 for BERT in the paper).
        bias_correction: divide the moments by ``1 − β^t`` (Algorithm 2 does).
        clamp: ``(γ_l, γ_u)`` bounds of ``φ``; ``None`` is the identity.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        clamp: tuple[float, float] | None = None,
    ) -> None:
        if not lr >= 0:
            raise BatchpilotError(f"LAMB lr must be >= 0, got {lr!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise BatchpilotError(f"LAMB betas must be in [0, 1), got {betas!r}")
        if not eps > 0:
            raise BatchpilotError(f"LAMB eps must be > 0, got {eps!r}")
        if not weight_decay >= 0:
            raise BatchpilotError(f"LAMB weight decay must be >= 0, got {weight_decay!r}")
        if clamp is not None and not 0 <= clamp[0] <= clamp[1]:
            raise BatchpilotError(f"LAMB clamp must be (low, high) with 0 <= low <= high, got {clamp!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, clamp=tuple(clamp) if clamp is not None else None)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One update; ``closure`` re-evaluates the loss as in ``torch.optim``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise BatchpilotError("LAMB does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                if group["bias_correction"]:
                    m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
                else:
                    m_hat, v_hat = m, v
                u = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"] != 0:
                    u.add_(p, alpha=group["weight_decay"])
                w_norm = torch.linalg.vector_norm(p)
                if group["clamp"] is not None:
                    w_norm = w_norm.clamp(*group["clamp"])
                u_norm = torch.linalg.vector_norm(u)
                ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.sub_(u * (group["lr"] * ratio))
        return loss
