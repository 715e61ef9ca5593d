"""Per-example gradient norms of ``nn.Conv1d``/``nn.Conv2d`` from the input and the output gradient.

Example ``i``'s weight gradient at kernel offset ``j`` is ``δ_i x_jᵀ`` with ``x_j`` the input slice
that offset sees (a block of im2col's columns); its squared norm is summed over the offsets, or taken
in the Gram form when the output has few positions (Goodfellow 2015; Rochette et al. 2019 for
per-example convolution gradients; Gray et al. 2023). Three routes, chosen by size: the Gram form, one
matmul over im2col (thin inputs or few examples) and one matmul per offset (wide inputs).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from batchpilot.noise.layer_rules import _chunks, _Rule, _Unsupported, _batch_major, _work_dtype

_FORCE_ROUTE: str | None = None
"""Tests set a route here to check each one against torch.func."""


def conv_route(rows: int, length: int, padded: int, c_in: int, kk: int, c_out: int) -> str:
    """How to compute a conv layer's per-example norms, by operation count per example and group.

    ``length``: output positions L; ``padded``: padded input positions P; ``c_in``/``c_out`` per group;
    ``kk``: kernel offsets. Routes: ``shifted-gram`` (one Gram matrix of the input over its positions,
    ``P²·c_in``, gathered at every offset, plus the output gradient's, ``L²·c_out``), ``gram`` (a Gram
    matrix per offset, ``L²·(c_in·k + c_out)``), and the per-example product ``L·c_in·k·c_out`` over
    im2col's columns (``im2col``: thin inputs or few examples) or offset by offset (``offsets``).
    Weights measured on one CPU thread: the product at 1, the shifted Gram at 1.5 (``Conv1d(32, 32, 3)``,
    L = 20, 128 examples: 0.89 against 1.56 ms), the per-offset Gram at 3 (its k small matmuls)."""
    if _FORCE_ROUTE is not None:
        return _FORCE_ROUTE
    product = length * c_in * kk * c_out
    costs = {"shifted-gram": 1.5 * (padded * padded * c_in + length * length * (c_out + kk)),
             "gram": 3.0 * length * length * (c_in * kk + c_out), "product": float(product)}
    best = min(costs, key=costs.get)
    if best != "product":
        return best
    return "im2col" if c_in * kk <= _UNFOLD_MAX_COLS or rows * c_in * kk * length <= _UNFOLD_MAX_ELEMS else "offsets"


_UNFOLD_MAX_COLS = 16
"""Conv layers with at most this many im2col rows per group (``C_in/g · k``) take one matmul over im2col
(measured on one CPU thread: 0.32 against 0.71 ms for ``Conv1d(1, 32, 5)`` at 128 examples; wider inputs
are faster offset by offset, 1.4 against 1.7 ms for ``Conv1d(32, 32, 3)``)."""

_UNFOLD_MAX_ELEMS = 1 << 16
"""...and so do layers whose im2col holds at most this many elements (few examples, as with
``max_examples``): there the offsets' many small kernels cost more than building the columns."""


class _ConvRule(_Rule):
    """Conv1d/Conv2d, group by group, through the kernel offsets.

    With ``x_j`` the (padded, strided) input seen at kernel offset ``j`` — an ``(C_in/g, L)`` slice,
    the columns of im2col for that offset — example ``i``'s weight gradient at offset ``j`` is
    ``δ_i x_jᵀ`` (``δ_i``: ``(C_out/g, L)``), so its squared norm is ``Σ_j |δ_i x_jᵀ|²`` (one batched
    matmul per offset, no im2col copy) or, in the Gram form, ``Σ_{l,m} (Σ_j x_jᵀ x_j)_{lm} (δᵀδ)_{lm}``.
    """

    def __init__(self, dims: int) -> None:
        self.dims = dims
        self.name = f"Conv{dims}d"

    def prepare(self, module, x, y, n):
        if x.dim() != self.dims + 2:
            raise _Unsupported(f"{self.name} input of shape {tuple(x.shape)} has no batch dimension")
        _batch_major(x, n, self.dims + 2, self.name)
        return x

    @staticmethod
    def _padded(module, x, dt):
        x = x.to(dt)
        pad = module._reversed_padding_repeated_twice
        if any(pad):
            x = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
        return x

    def _offsets(self, module, x, out_shape):
        """The input slice of every kernel offset, each ``(N·g, L, C_in/g)`` and contiguous (the layout in
        which the batched matmuls below run fast on CPU)."""
        n, g = x.shape[0], module.groups
        k, s, dil = module.kernel_size, module.stride, module.dilation
        for j in itertools.product(*(range(kk) for kk in k)):
            idx = tuple(slice(jj * dd, jj * dd + ss * (o - 1) + 1, ss) for jj, dd, ss, o in zip(j, dil, s, out_shape))
            xs = x[(slice(None), slice(None)) + idx].reshape(n * g, module.in_channels // g, -1)
            yield xs.transpose(1, 2).contiguous()

    def sq_norms(self, module, x, d, m):
        if m < x.shape[0]:
            x, d = x[:m], d[:m]
        n, g, dt = x.shape[0], module.groups, _work_dtype(d)
        out = None
        if module.weight.requires_grad:
            xp = self._padded(module, x, dt)
            d3 = d.to(dt).reshape(n * g, module.out_channels // g, -1)  # (N·g, O, L)
            length, c_in, c_out = d3.shape[-1], module.in_channels // g, d3.shape[1]
            kk = math.prod(module.kernel_size)
            route = conv_route(n * g, length, math.prod(xp.shape[2:]), c_in, kk, c_out)
            rows = _chunks(n * g, length * length if route == "gram" else c_in * c_out)
            if route == "shifted-gram":
                parts = [self._shifted_gram(module, xp[c], d3[c.start * g:c.stop * g], d.shape[2:]) for c in
                         _chunks(n, g * (math.prod(xp.shape[2:]) ** 2 + length * length))]
            elif route == "gram":
                gram = [None] * len(rows)
                for xs in self._offsets(module, xp, d.shape[2:]):
                    for i, c in enumerate(rows):
                        a = torch.bmm(xs[c], xs[c].transpose(1, 2))
                        gram[i] = a if gram[i] is None else gram[i].add_(a)
                parts = [torch.linalg.vecdot(gr.flatten(1), torch.bmm(d3[c].transpose(1, 2), d3[c]).flatten(1))
                         for gr, c in zip(gram, rows)]
            elif route == "im2col":
                # thin offsets, or few examples: one matmul over im2col's columns (fewer, larger kernels)
                cols = self._columns(module, xp).reshape(n * g, c_in * kk, -1)
                parts = [torch.linalg.vector_norm(torch.bmm(d3[c], cols[c].transpose(1, 2)), dim=(1, 2)).square()
                         for c in _chunks(n * g, c_out * c_in * kk)]
            else:
                parts = [None] * len(rows)
                for xs in self._offsets(module, xp, d.shape[2:]):
                    for i, c in enumerate(rows):
                        part = torch.linalg.vector_norm(torch.bmm(d3[c], xs[c]), dim=(1, 2)).square()
                        parts[i] = part if parts[i] is None else parts[i].add_(part)
            w = parts[0] if len(parts) == 1 else torch.cat(parts)
            out = w.view(n, g).sum(1) if g > 1 else w
        if module.bias is not None and module.bias.requires_grad:
            sd = d.to(dt).reshape(n, module.out_channels, -1).sum(2)
            bb = torch.linalg.vecdot(sd, sd)
            out = bb if out is None else out + bb
        return out if out is not None else torch.zeros(n, dtype=dt, device=d.device)

    def _shifted_gram(self, module, xp, d3, out_shape):
        """``Σ_{l,m} (Σ_j X_jᵀX_j)_{lm} (δᵀδ)_{lm}`` per example and group for a chunk of examples, with
        ``Σ_j X_jᵀX_j`` gathered from one Gram matrix of the padded input over its positions."""
        n, g = xp.shape[0], module.groups
        xf = xp.reshape(n * g, module.in_channels // g, -1)  # (N·g, C_in/g, P)
        g0 = torch.bmm(xf.transpose(1, 2), xf)  # (N·g, P, P)
        grid = tuple(xp.shape[2:])
        g0 = g0.view(n * g, *grid, *grid)
        gx = None
        for j in itertools.product(*(range(kk) for kk in module.kernel_size)):  # strided views, no gather
            idx = tuple(slice(jj * dd, jj * dd + ss * (o - 1) + 1, ss)
                        for jj, dd, ss, o in zip(j, module.dilation, module.stride, out_shape))
            a = g0[(slice(None),) + idx + idx]
            gx = a.clone() if gx is None else gx.add_(a)
        return torch.linalg.vecdot(gx.flatten(1), torch.bmm(d3.transpose(1, 2), d3).flatten(1))

    def _columns(self, module, xp):
        """im2col of the padded input: ``(N, C_in·k, L)``."""
        k, s, dil = module.kernel_size, module.stride, module.dilation
        if self.dims == 1:
            xp, k, s, dil = xp.unsqueeze(2), (1, k[0]), (1, s[0]), (1, dil[0])
        return F.unfold(xp, k, dilation=dil, padding=0, stride=s)

    def batch_grads(self, module, x, d):
        out = {}
        dt = _work_dtype(d)
        if module.weight.requires_grad:
            xp = self._padded(module, x, dt)
            cols = self._columns(module, xp)  # (N, C_in·k, L)
            n, g = x.shape[0], module.groups
            cols = cols.view(n, g, -1, cols.shape[-1])
            d4 = d.to(dt).reshape(n, g, module.out_channels // g, -1)
            out["weight"] = torch.einsum("ngol,ngkl->gok", d4, cols).reshape(module.weight.shape)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = d.to(dt).reshape(d.shape[0], module.out_channels, -1).sum((0, 2))
        return out

