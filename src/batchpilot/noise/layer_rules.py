"""Per-example gradient norms of single layers, from the layer's input and output gradient.

The rules behind :mod:`batchpilot.noise.per_example` (Goodfellow 2015, "Efficient per-example
gradient computations"; Li et al. 2022 "ghost clipping"; Gray et al. 2023/2024). Each rule turns a
layer's saved input ``x`` and its output gradient ``δ`` (taken during the ordinary backward) into
the per-example squared norms of the layer's parameter gradients, and once per layer into the
batch gradient (the monitor's check that the split is exact). This module holds the linear
(batch and sequence inputs, with the cheaper of the Gram form and the per-example product),
embedding and LayerNorm/RMSNorm rules and their shared helpers; the convolution rule is in
:mod:`batchpilot.noise.conv_rule`. Nothing here keeps a per-example gradient beyond one chunk of
examples, and nothing writes to the tensors it reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORM_TYPES: tuple[type, ...] = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

_CHUNK_ELEMS = 1 << 22
"""Largest block (elements) built at once: per-example gradients, or Gram matrices, of a chunk of examples."""


class _Unsupported(Exception):
    """The layer's call cannot be split into examples (the message says why)."""


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _batch_major(x: torch.Tensor, n: int | None, min_dim: int, what: str) -> None:
    if x.dim() < min_dim:
        raise _Unsupported(f"{what} input of shape {tuple(x.shape)} has no batch dimension")
    if n is not None and x.shape[0] != n:
        raise _Unsupported(f"{what} input's first dimension {x.shape[0]} is not the batch ({n})")


def _chunks(n: int, per_example: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMS // max(1, per_example))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _gram_is_cheaper(t: int, a: int, b: int) -> bool:
    """Whether the Gram form (``T²(a+b)`` per example) beats the per-example product (``T·a·b``).

    The factor 3 is measured on one CPU thread: the product's one batched matmul and fused norm beat
    the Gram form's two matmuls and ``(T, T)`` product at equal operation counts (e.g. ``T=16, a=b=64``:
    0.14 ms against 0.21 ms for 32 examples; ``T=64, a=64, b=192``: 0.64 against 1.44)."""
    return 3 * t * (a + b) < a * b


def _outer_sq(x3: torch.Tensor, d3: torch.Tensor) -> torch.Tensor:
    """``|Σ_t d_t x_tᵀ|²`` per example for ``x3 (N, T, a)``, ``d3 (N, T, b)``: the cheaper of the Gram form
    and the per-example product (built a chunk of examples at a time)."""
    n, t, a = x3.shape
    b = d3.shape[-1]
    if t == 1:
        return torch.linalg.vecdot(x3[:, 0], x3[:, 0]) * torch.linalg.vecdot(d3[:, 0], d3[:, 0])
    if _gram_is_cheaper(t, a, b):  # Σ_{t,s} (x_t·x_s)(d_t·d_s)
        parts = [torch.linalg.vecdot(torch.bmm(x3[c], x3[c].transpose(1, 2)).flatten(1),
                                     torch.bmm(d3[c], d3[c].transpose(1, 2)).flatten(1)) for c in _chunks(n, t * t)]
    else:
        parts = [torch.linalg.vector_norm(torch.bmm(d3[c].transpose(1, 2), x3[c]), dim=(1, 2)).square()
                 for c in _chunks(n, a * b)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# -- the layer rules: per-example squared norms, and the batch gradient (for the one-time check) --------
class _Rule:
    """How one layer type's per-example gradient norms follow from its input and output gradient."""

    name = ""

    def prepare(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int | None):
        """Validate the input ``x`` (output ``y``) at the forward; return what the backward needs (raise
        :class:`_Unsupported`). The default keeps the input, which the layer's own backward keeps anyway."""
        raise NotImplementedError

    def sq_norms(self, module: nn.Module, x, d: torch.Tensor, m: int) -> torch.Tensor:
        """Per-example squared gradient norm over the module's trainable parameters for the first ``m``
        examples, shape ``(m,)``."""
        raise NotImplementedError

    def batch_grads(self, module: nn.Module, x: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
        """The module's contribution to each trainable parameter's batch gradient (the check's reference)."""
        raise NotImplementedError


class _LinearRule(_Rule):
    """``y = x Wᵀ + b`` over the last dimension (``nn.Linear``); ``transposed``: ``y = x W + b`` (HF Conv1D)."""

    def __init__(self, transposed: bool = False) -> None:
        self.transposed = transposed
        self.name = "Conv1D" if transposed else "Linear"

    def prepare(self, module, x, y, n):
        _batch_major(x, n, 2, self.name)
        return x

    def sq_norms(self, module, x, d, m):
        dt = _work_dtype(d)
        if m < x.shape[0]:
            x, d = x[:m], d[:m]
        if d.dtype != dt:
            x, d = x.to(dt), d.to(dt)
        w = module.weight.requires_grad
        b = module.bias is not None and module.bias.requires_grad
        if x.dim() == 2:  # |x_i|² |δ_i|² (+ |δ_i|²): three small kernels
            dd = torch.linalg.vecdot(d, d)
            if not w:
                return dd
            xx = torch.linalg.vecdot(x, x.to(dt))
            return torch.addcmul(dd, xx, dd) if b else xx * dd
        n = x.shape[0]
        x3 = x.reshape(n, -1, x.shape[-1]).to(dt)
        d3 = d.reshape(n, -1, d.shape[-1])
        out = _outer_sq(x3, d3) if w else None
        if b:
            bb = d3.sum(1).square().sum(1)
            out = bb if out is None else out + bb
        return out if out is not None else torch.zeros(n, dtype=dt, device=d.device)

    def batch_grads(self, module, x, d):
        dt = _work_dtype(d)
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        d2 = d.reshape(-1, d.shape[-1]).to(dt)
        out = {}
        if module.weight.requires_grad:
            out["weight"] = x2.T @ d2 if self.transposed else d2.T @ x2
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = d2.sum(0)
        return out


class _EmbeddingRule(_Rule):
    name = "Embedding"

    def prepare(self, module, x, y, n):
        if module.sparse:
            raise _Unsupported("Embedding with sparse=True (sparse gradients)")
        if module.scale_grad_by_freq:
            raise _Unsupported("Embedding with scale_grad_by_freq (the scale depends on the whole batch)")
        _batch_major(x, n, 2, "Embedding")  # a 1-D index (a position table's arange) is not per example
        return x

    def _masked(self, module, x, d):
        n = x.shape[0]
        idx = x.reshape(n, -1)
        d3 = d.reshape(n, idx.shape[1], -1).to(_work_dtype(d))
        if module.padding_idx is not None:
            d3 = d3 * (idx != module.padding_idx).unsqueeze(-1).to(d3.dtype)
        return idx, d3

    def sq_norms(self, module, x, d, m):
        idx, d3 = self._masked(module, x[:m], d[:m])
        n, t, dim = d3.shape
        if t == 1:
            return d3[:, 0].square().sum(1)
        vocab = module.num_embeddings
        if t * t * dim <= vocab * dim:  # Gram form over equal indices
            same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(d3.dtype)
            return (torch.bmm(d3, d3.transpose(1, 2)) * same).sum((1, 2))
        parts = []
        for c in _chunks(n, vocab * dim):  # per-example rows: scatter into (chunk, vocab, dim)
            rows = torch.zeros(c.stop - c.start, vocab, dim, dtype=d3.dtype, device=d3.device)
            rows.scatter_add_(1, idx[c].unsqueeze(-1).expand(-1, -1, dim), d3[c])
            parts.append(rows.square().sum((1, 2)))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def batch_grads(self, module, x, d):
        if not module.weight.requires_grad:
            return {}
        idx, d3 = self._masked(module, x, d)
        w = torch.zeros(module.num_embeddings, d3.shape[-1], dtype=d3.dtype, device=d3.device)
        return {"weight": w.index_add_(0, idx.reshape(-1), d3.reshape(-1, d3.shape[-1]))}


def _affine_invertible(w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether ``x̂ = (y - b)/w`` is exact enough: no zero in ``w`` and ``|b| <= 1e3 |w|``.

    Small CPU parameters are read as Python floats: a handful of tiny kernels and a ``.item()`` cost
    tens of microseconds each between the forward's large ones, the list costs a few."""
    if w.device.type == "cpu" and w.numel() <= 4096:
        ws = w.detach().reshape(-1).tolist()
        if b is None:
            return all(v != 0.0 for v in ws)
        return all(abs(bv) <= 1e3 * abs(wv) and wv != 0.0 for wv, bv in zip(ws, b.detach().reshape(-1).tolist()))
    with torch.no_grad():
        return bool(w.abs().min() > 0) if b is None else float((b / w).abs().max()) <= 1e3


class _NormRule(_Rule):
    """LayerNorm and RMSNorm: elementwise affine ``y = x̂ ⊙ w + b`` over ``normalized_shape``.

    Example ``i``'s weight gradient is ``Σ_t δ_t ⊙ x̂_t = (Σ_t δ_t ⊙ y_t - b ⊙ Σ_t δ_t) / w``: one product
    with the output (which the next layer usually keeps for its own backward) and sums, the division
    only on the ``(N, D)`` sums. Where ``w`` has a zero, or ``|b| > 1e3 |w|`` (float32 cancellation
    of more than ~1e-4), or the output was modified in place, ``x̂`` is recomputed from the input.
    """

    def __init__(self, rms: bool) -> None:
        self.rms = rms
        self.name = "RMSNorm" if rms else "LayerNorm"

    def prepare(self, module, x, y, n):
        _batch_major(x, n, len(module.normalized_shape) + 1, self.name)
        w, b = module.weight, getattr(module, "bias", None)
        from_output = False
        if w is not None:
            from_output = _affine_invertible(w, b)
        return x, (y.detach() if from_output else None), y._version

    def _sums(self, module, saved, d, m):
        """Per-example ``(Σ_t δ_t ⊙ x̂_t, Σ_t δ_t)`` as ``(n, D)`` each (the first ``None`` without a weight)."""
        x, y, version = saved
        x, d = x[:m], d[:m]
        n, dt = x.shape[0], _work_dtype(d)
        shape = tuple(module.normalized_shape)
        k = math.prod(shape)
        d3 = d.to(dt).reshape(n, -1, k)
        sd = d3.sum(1)
        w, b = module.weight, getattr(module, "bias", None)
        if w is None or not w.requires_grad:
            return None, sd
        if y is not None and y._version == version:
            sy = (d3 * y[:m].to(dt).reshape(n, -1, k)).sum(1)
            if b is not None:
                sy = sy - b.detach().to(dt).reshape(-1) * sd
            return sy / w.detach().to(dt).reshape(-1), sd
        xh = x.to(dt)
        xh = F.rms_norm(xh, shape, None, module.eps) if self.rms else F.layer_norm(xh, shape, None, None, module.eps)
        return (d3 * xh.reshape(n, -1, k)).sum(1), sd

    def sq_norms(self, module, saved, d, m):
        sw, sd = self._sums(module, saved, d, m)
        out = torch.zeros(sd.shape[0], dtype=sd.dtype, device=sd.device)
        if sw is not None:
            out = out + sw.square().sum(1)
        bias = getattr(module, "bias", None)
        if bias is not None and bias.requires_grad:
            out = out + sd.square().sum(1)
        return out

    def batch_grads(self, module, saved, d):
        sw, sd = self._sums(module, saved, d, d.shape[0])
        shape = tuple(module.normalized_shape)
        out = {}
        if sw is not None:
            out["weight"] = sw.sum(0).reshape(shape)
        bias = getattr(module, "bias", None)
        if bias is not None and bias.requires_grad:
            out["bias"] = sd.sum(0).reshape(shape)
        return out


