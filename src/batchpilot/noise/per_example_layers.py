"""The per-example monitor's building blocks: which rule a module gets, the layer selection, and the
state kept per hooked layer and per recorded backward (:mod:`batchpilot.noise.per_example`).

The rules themselves (the per-example norm formulas) are in :mod:`batchpilot.noise.layer_rules` and
:mod:`batchpilot.noise.conv_rule`.
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Union

import torch
from torch import nn

from batchpilot.errors import BatchpilotError
from batchpilot.noise.conv_rule import _ConvRule
from batchpilot.noise.layer_rules import NORM_TYPES, _EmbeddingRule, _LinearRule, _NormRule, _Rule

LayerSelection = Union[None, str, Callable[[str, nn.Module], bool], Iterable[Union[str, type]]]



_LINEAR, _LINEAR_T = _LinearRule(), _LinearRule(transposed=True)
_RULES: list[tuple[type, _Rule]] = [
    (nn.Linear, _LINEAR), (nn.Embedding, _EmbeddingRule()), (nn.LayerNorm, _NormRule(rms=False)),
    (nn.Conv1d, _ConvRule(1)), (nn.Conv2d, _ConvRule(2)),
] + ([(nn.RMSNorm, _NormRule(rms=True))] if hasattr(nn, "RMSNorm") else [])


def rule_for(module: nn.Module) -> _Rule | None:
    """The per-example rule for ``module``'s type, or ``None`` (transformers' ``Conv1D`` is matched by name)."""
    for cls, rule in _RULES:
        if type(module) is cls or (isinstance(module, cls) and type(module).forward is cls.forward):
            return rule
    if type(module).__name__ == "Conv1D" and getattr(module, "nf", None) is not None \
            and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return _LINEAR_T
    return None


def _own_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(k, p) for k, p in module.named_parameters(recurse=False) if p.requires_grad]



def _selector(layers: LayerSelection) -> Callable[[str, nn.Module], bool]:
    if layers is None or layers == "all":
        return lambda name, m: True
    if layers == "norm":
        return lambda name, m: isinstance(m, NORM_TYPES)
    if layers == "cheap":  # the linear layers stay only if their input turns out to be (N, d): see _forward_hook
        return lambda name, m: isinstance(m, NORM_TYPES) or rule_for(m) in (_LINEAR, _LINEAR_T)
    if isinstance(layers, str):
        raise BatchpilotError(f"layers must be 'all', 'norm', 'cheap', module names/types or a predicate, got {layers!r}")
    if callable(layers) and not isinstance(layers, type):
        return layers
    items = list(layers) if not isinstance(layers, type) else [layers]
    names = {x for x in items if isinstance(x, str)}
    types = tuple(x for x in items if isinstance(x, type))
    if len(names) + len(types) != len(items):
        raise BatchpilotError(f"layers must hold module names (str) or module classes, got {items!r}")
    return lambda name, m: name in names or (bool(types) and isinstance(m, types))


class _Micro(NamedTuple):
    """One recorded backward: its layers, the examples' summed squared norms (first ``m`` examples),
    their units (one float for all, or a tensor), the micro-batch's units and |p.grad| after it."""

    layers: tuple
    per_ex: torch.Tensor
    m: int
    u: float | torch.Tensor
    total: float
    big: torch.Tensor | None


class _Layer:
    """Per-module state: its rule, its step's saved input, its norms and its check."""

    __slots__ = ("name", "module", "rule", "params", "saved", "calls", "sq", "n", "reason", "checked",
                 "contrib", "leaf", "leaf_handles")

    def __init__(self, name: str, module: nn.Module, rule: _Rule) -> None:
        self.name, self.module, self.rule = name, module, rule
        self.params = _own_params(module)
        self.reason: str | None = None  # why it falls back (permanent)
        self.checked = False
        self.contrib: dict[str, torch.Tensor] | None = None  # the check's reference (first backward only)
        self.leaf: dict[str, torch.Tensor] = {}
        self.leaf_handles: list = []
        self.clear()

    def clear(self) -> None:
        self.saved = None
        self.calls = 0
        self.sq: torch.Tensor | None = None
        self.n = 0  # examples in the call (``sq`` holds the first ``max_examples`` of them)
        if self.contrib is not None or self.leaf_handles or self.leaf:
            for h in self.leaf_handles:
                h.remove()
            self.contrib, self.leaf, self.leaf_handles = None, {}, []


_IS_WRAPPED = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def _functorch_wrapped(t: torch.Tensor) -> bool:
    return bool(_IS_WRAPPED(t)) if _IS_WRAPPED is not None else False


def _store_into(store: dict, key: str):
    def hook(grad: torch.Tensor) -> None:
        store[key] = grad.detach().clone()  # the parameter's gradient of this backward, from every use

    return hook
