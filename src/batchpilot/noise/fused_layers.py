"""The per-example monitor's *fused* mode: sequence Linear layers whose backward computes the
per-example weight gradients instead of autograd's batch weight gradient.

For a linear layer on a sequence (input ``x (N, T, d_in)``, output gradient ``δ (N, T, d_out)``) the
hooks of :mod:`batchpilot.noise.per_example_hooks` compute each example's gradient norm on top of the
layer's own weight gradient ``Σ_{i,t} δ_{i,t} x_{i,t}ᵀ``: the per-example product ``|Σ_t δ_t x_tᵀ|²``
(Goodfellow 2015) costs as much again. Here the layer's forward is the same op through
:class:`_FusedLinear`, whose backward builds the per-example weight gradients ``G_i = δ_iᵀ x_i`` with one
batched matmul (the "expanded weights" of Opacus; Gray et al. 2023/2024 fuse the norms into the
backward likewise), takes their squared norms and returns ``Σ_i G_i`` as the weight gradient: the extra
work is that sum and the norms. The input gradient is ``δ W`` as in autograd.

The outputs are bit-identical to the layer's; the weight and bias gradients equal autograd's up to the
summation order (per example, then over examples: float32 rounding, not bit-identical). The swap is an
instance attribute ``forward`` on each fused layer, removed (or the previous instance attribute put
back) by :func:`unfuse`; a call outside the monitor's conditions (inactive monitor, no grad, a 2-D
input, autocast, a torch.func transform, a layer's second call or fallback) takes the original forward,
and the hooks handle it as without fusion.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from batchpilot.noise import layer_rules
from batchpilot.noise.layer_rules import _chunks, _gram_is_cheaper, _LinearRule
from batchpilot.noise.per_example_layers import _functorch_wrapped, _Layer

_MISSING = object()


def _chunk_elems() -> int:
    return layer_rules._CHUNK_ELEMS  # (read at call time: the tests shrink it)


class _FusedCall:
    """Token of one fused call: the layer's ``saved`` holds it until its backward turns it into norms."""

    __slots__ = ("layer", "m")

    def __init__(self, layer: _Layer, m: int | None) -> None:
        self.layer, self.m = layer, m


def _apply_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """The layer's own op: ``F.linear`` (``nn.Linear``) or transformers' ``Conv1D`` (``addmm`` on a view)."""
    if not transposed:
        return F.linear(x, weight, bias)
    size_out = x.size()[:-1] + (weight.shape[1],)
    flat = x.view(-1, x.size(-1))
    out = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
    return out.view(size_out)


class _FusedLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` (or ``x W + b``, ``transposed``) whose backward also hands the layer its
    per-example squared gradient norms (weight and bias together, for the token's first ``m`` examples)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool,
                call: _FusedCall) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.transposed, ctx.call, ctx.has_bias = transposed, call, bias is not None
        return _apply_linear(x, weight, bias, transposed)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        call, transposed = ctx.call, ctx.transposed
        grad_x = None
        if ctx.needs_input_grad[0]:
            g2 = grad.reshape(-1, grad.shape[-1])
            grad_x = (g2 @ (weight.T if transposed else weight)).view(x.shape)
        want_w, want_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        layer = call.layer
        record = layer.saved is call and layer.calls == 1  # else: a second call, or cleared: no norms
        grad_w, grad_b, sq = per_example_linear_grads(x, grad, transposed, call.m if record else 0, want_w, want_b)
        if record:
            layer.saved = None
            layer.n, layer.sq = x.shape[0], sq
            if not layer.checked:  # the check's reference: what this call hands its parameters
                layer.contrib = {k: v.detach().clone() for k, v in (("weight", grad_w), ("bias", grad_b))
                                 if v is not None}
        return grad_x, grad_w, grad_b, None, None


def per_example_linear_grads(x: torch.Tensor, d: torch.Tensor, transposed: bool, m: int, want_w: bool = True,
                             want_b: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """A linear layer's batch weight and bias gradients, and the first ``m`` examples' squared norms.

    The first ``m`` examples' weight gradients are built per example (one batched matmul per chunk of
    examples, their norms taken and summed into the batch gradient), the rest with one matmul.

    Args:
        x: the layer's input ``(N, ..., d_in)``.
        d: the gradient of its output ``(N, ..., d_out)``.
        transposed: weight stored ``(d_in, d_out)`` (transformers' ``Conv1D``) instead of ``(d_out, d_in)``.
        m: examples whose norms are taken (``0``: none, the gradients only).
        want_w, want_b: which gradients to return (``None`` for the other).

    Returns:
        ``(grad_weight, grad_bias, sq)``: ``sq (m,)`` the squared norm over the wanted parameters.
    """
    n = x.shape[0]
    m = min(m, n)
    x3 = x.reshape(n, -1, x.shape[-1])
    d3 = d.reshape(n, -1, d.shape[-1])
    acc = torch.float32 if d.dtype in (torch.float16, torch.bfloat16) else d.dtype  # 16-bit: sums in float32
    track = torch.is_grad_enabled()  # a backward with create_graph=True: the norms need no graph

    def plain(t: torch.Tensor) -> torch.Tensor:
        return t.detach() if track else t

    w_sq = b_sq = grad_w = grad_b = None
    low = acc != d.dtype
    if want_w:
        a, b = (x3, d3) if transposed else (d3, x3)  # G_i = a_iᵀ b_i
        if m == n and n * x3.shape[-1] * d3.shape[-1] <= _chunk_elems():  # the usual case: one batched matmul
            g = torch.bmm(a.transpose(1, 2), b)
            grad_w = g.sum(0, dtype=acc).to(d.dtype) if low else g.sum(0)
            w_sq = torch.linalg.vector_norm(plain(g), dim=(1, 2), dtype=acc if low else None)
        else:
            parts, norms = [], []
            for c in _chunks(m, x3.shape[-1] * d3.shape[-1]) if m else []:
                g = torch.bmm(a[c].transpose(1, 2), b[c])
                parts.append(g.sum(0, dtype=acc))
                norms.append(torch.linalg.vector_norm(plain(g), dim=(1, 2), dtype=acc))
            if m < n:
                parts.append((a[m:].reshape(-1, a.shape[-1]).T @ b[m:].reshape(-1, b.shape[-1])).to(acc))
            grad_w = (parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)).to(d.dtype)
            if norms:
                w_sq = norms[0] if len(norms) == 1 else torch.cat(norms)
    if want_b:
        per = d3.sum(1, dtype=acc) if low else d3.sum(1)
        grad_b = per.sum(0).to(d.dtype) if low else per.sum(0)
        if m:
            pm = plain(per if m == n else per[:m])
            b_sq = torch.linalg.vecdot(pm, pm)
    if w_sq is None:
        sq = b_sq if b_sq is not None else torch.zeros(m, dtype=acc, device=d.device)
    else:
        sq = w_sq.square() if b_sq is None else torch.addcmul(b_sq, w_sq, w_sq)
    return grad_w, grad_b, sq


def fusable(layer: _Layer) -> bool:
    """Whether ``layer`` is a Linear/Conv1D whose weight trains (the fused mode swaps its forward)."""
    return isinstance(layer.rule, _LinearRule) and layer.module.weight.requires_grad


def _same(obj: Any) -> Any:
    return obj


def _class_forward(module: nn.Module) -> Callable:
    """The class's ``forward`` bound to ``module`` (needs none of the module's state yet: unpickling
    calls this before the module's attributes are restored)."""
    return type(module).forward.__get__(module)


class _FusedForward:
    """A fused layer's ``forward`` (an instance attribute): the fused op under the monitor's conditions,
    else ``original`` (the forward it replaced). ``previous`` is the instance attribute it replaced
    (``_MISSING``: none, the class's forward)."""

    __slots__ = ("monitor", "layer", "original", "previous")

    def __init__(self, monitor: Any, layer: _Layer, original: Callable, previous: Any) -> None:
        self.monitor, self.layer, self.original, self.previous = monitor, layer, original, previous

    def __deepcopy__(self, memo: dict) -> Any:
        """A copy of the model (an EMA copy, say) gets the forward this one replaced, not the monitor."""
        if self.previous is not _MISSING:
            return copy.deepcopy(self.previous, memo)
        module = copy.deepcopy(self.layer.module, memo)
        return type(module).forward.__get__(module)

    def __reduce__(self) -> tuple:
        """``torch.save(model)`` with the monitor attached pickles the forward this one replaced (the
        class's, bound to the module), not the monitor: a loaded copy runs plain."""
        if self.previous is not _MISSING:
            return (_same, (self.previous,))
        return (_class_forward, (self.layer.module,))

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        monitor, layer, original = self.monitor, self.layer, self.original
        module = layer.module
        weight, bias = module.weight, module.bias
        if args or kwargs or not isinstance(x, torch.Tensor) or x.dim() < 3 or not monitor.active \
                or not torch.is_grad_enabled() or layer.reason is not None \
                or monitor._by_module.get(module) is not layer or not weight.requires_grad \
                or x.dtype != weight.dtype or torch.is_autocast_enabled(x.device.type) \
                or _functorch_wrapped(x) or _functorch_wrapped(weight) \
                or (monitor._batch is not None and x.shape[0] != monitor._batch):
            return original(x, *args, **kwargs)
        if layer.calls:  # called again in this forward, or recomputed by activation checkpointing (which
            # needs the same op as the first call): the fused op if the first call took it, without norms
            # (the hooks count the calls and the layer falls back)
            if not isinstance(layer.saved, _FusedCall):
                return original(x, *args, **kwargs)
            return _FusedLinear.apply(x, weight, bias, layer.rule.transposed, _FusedCall(layer, 0))
        n = x.shape[0]
        t = x.numel() // (n * x.shape[-1]) if n else 0
        d_out = weight.shape[1] if layer.rule.transposed else weight.shape[0]
        if t < 2 or _gram_is_cheaper(t, x.shape[-1], d_out):  # the hooks' Gram form is cheap here: no fusion
            return original(x, *args, **kwargs)
        call = _FusedCall(layer, monitor.max_examples or n)
        layer.saved = call
        return _FusedLinear.apply(x, weight, bias, layer.rule.transposed, call)


def fuse(monitor: Any, layer: _Layer) -> None:
    """Swap ``layer.module``'s forward for the fused one (an instance attribute; :func:`unfuse` undoes it)."""
    module: nn.Module = layer.module
    previous = module.__dict__.get("forward", _MISSING)
    module.__dict__["forward"] = _FusedForward(monitor, layer, module.forward, previous)


def unfuse(module: nn.Module, monitor: Any) -> None:
    """Take ``monitor``'s fused forward out of ``module``: the forward it replaced is back (the class's, or
    the instance attribute it found). Another monitor's fused forward stacked on top of it stays, calling
    what this one called."""
    parent, cur = None, module.__dict__.get("forward", _MISSING)
    while isinstance(cur, _FusedForward):
        if cur.monitor is monitor:
            if parent is not None:
                parent.original, parent.previous = cur.original, cur.previous
            elif cur.previous is _MISSING:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = cur.previous
            return
        parent, cur = cur, cur.original
