"""The reference the per-example noise tests compare with: per-sample gradients by ``torch.func``."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def per_sample_grads(model: nn.Module, loss_i, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of ``loss_i(output_i, y_i)`` (one example's loss) for every example, by torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def one(p, xi, yi):
        return loss_i(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
