"""Save and restore everything a trial step changes, bit for bit: weights, buffers, grads, optimizer, RNG.

Snapshots live in host memory so they do not take device memory from the trial steps.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


def _to_host(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class TrainingState:
    """A host-memory copy of a model, its optimizer and the RNG states."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    buffers: list[torch.Tensor]
    training: list[bool]
    optimizer: dict[str, Any] | None
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    python_rng: Any
    numpy_rng: Any

    @classmethod
    def capture(cls, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> "TrainingState":
        """Copy the current state to host memory."""
        params = list(model.parameters())
        return cls(
            params=[p.detach().to("cpu", copy=True) for p in params],
            grads=[None if p.grad is None else p.grad.detach().to("cpu", copy=True) for p in params],
            buffers=[b.detach().to("cpu", copy=True) for b in model.buffers()],
            training=[m.training for m in model.modules()],
            optimizer=_to_host(optimizer.state_dict()) if optimizer is not None else None,
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
            python_rng=random.getstate(),
            numpy_rng=np.random.get_state(),
        )

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Write the saved state back in place (same tensors, same values, bit for bit)."""
        with torch.no_grad():
            for p, saved, grad in zip(model.parameters(), self.params, self.grads):
                p.copy_(saved)
                if grad is None:
                    p.grad = None
                elif p.grad is None:
                    p.grad = grad.to(p.device, copy=True)
                else:
                    p.grad.copy_(grad)
            for b, saved in zip(model.buffers(), self.buffers):
                b.copy_(saved)
        for m, mode in zip(model.modules(), self.training):
            m.training = mode
        if optimizer is not None and self.optimizer is not None:
            optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        random.setstate(self.python_rng)
        np.random.set_state(self.numpy_rng)
