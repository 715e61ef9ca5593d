"""The per-example monitor's hooks: installing them on a model, and what they do in the forward and
backward (:class:`~batchpilot.noise.per_example.PerExampleNoiseScale`'s first part).

A forward hook keeps each supported layer's input (which the layer's own backward keeps anyway); a
pre-hook on the autograd node that produced its output receives ``δ = ∂loss/∂output`` during the
normal backward and turns the pair into per-example squared norms with the layer's rule (Goodfellow
2015; Li et al. 2022; Gray et al. 2023/2024). Nothing here writes to the model's outputs or gradients.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from batchpilot.errors import BatchpilotError
from batchpilot.noise.fused_layers import _FusedCall, fusable, fuse, unfuse
from batchpilot.noise.layer_rules import _LinearRule, _Unsupported
from batchpilot.noise.per_example_layers import _functorch_wrapped, _Layer, _own_params, _store_into, rule_for


class _Inert:
    """What a monitor's hook becomes in a pickled copy of the model: nothing (returns ``None``)."""

    def __call__(self, *args, **kwargs) -> None:
        return None


class PicklesInert:
    """A hook on the user's model that pickles as :class:`_Inert`: ``torch.save(model)`` with a monitor
    attached saves the model, not the monitor (whose state need not pickle), and a loaded copy runs
    without it. The hook itself is unchanged while the monitor is attached."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple:
        return (_Inert, ())


class _Hooks:
    """Mixin of :class:`~batchpilot.noise.per_example.PerExampleNoiseScale`: the hooks (its state is
    made in that class's ``__init__``)."""

    def attach(self, model: nn.Module | Callable[[], nn.Module]) -> "_Hooks":  # the PerExampleNoiseScale itself
        """Hook ``model`` (a module now, or a callable returning it, resolved at the next :meth:`after_micro`)."""
        if isinstance(model, nn.Module):
            self._source = None
            self._install(model)
        elif callable(model):
            self._source = model
        else:
            raise BatchpilotError(f"PerExampleNoiseScale needs a module or a callable returning one, got {type(model).__name__}")
        return self

    def bind_model(self, model: nn.Module) -> None:
        """Hook ``model`` now, keeping an attached callable for later models (the trainer calls this when
        it builds its model, so that the first step is observed too)."""
        self._install(model)

    def _install(self, model: nn.Module) -> None:
        self.detach()
        self._model = model
        root = self._root()  # the module inside a DDP wrapper
        self._handles.append(model.register_forward_pre_hook(PicklesInert(self._root_pre_hook), with_kwargs=True))
        if self.grad_hooks:
            for p in root.parameters():
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(PicklesInert(self._grad_hook)))
        for name, m in root.named_modules():
            rule = rule_for(m)
            if rule is None or not _own_params(m) or not self._select(name, m):
                continue
            layer = _Layer(name, m, rule)
            self._layers.append(layer)
            self._by_module[m] = layer
            self._handles.append(m.register_forward_hook(PicklesInert(self._forward_hook)))
            if self.fused and fusable(layer):  # its backward gives the per-example gradients (fused_layers)
                fuse(self, layer)
                self._fused_modules.append(m)
        self._set_scope()

    def _set_scope(self) -> None:
        self._coverage = {}
        if self.scope == "all":
            self._scope = [(k, p) for k, p in self._root().named_parameters() if p.requires_grad]
        else:
            self._scope = [(f"{la.name}.{k}" if la.name else k, p) for la in self._layers for k, p in la.params]

    def _root(self) -> nn.Module:
        model = self._model
        inner = getattr(model, "module", None)
        return inner if isinstance(inner, nn.Module) and hasattr(model, "no_sync") else model

    def detach(self) -> None:
        """Remove every hook; the model runs exactly as without the monitor (the estimates stay)."""
        for h in self._handles:
            h.remove()
        for m in self._fused_modules:
            unfuse(m, self)
        self._fused_modules = []
        for layer in self._layers:
            layer.clear()
        self._handles, self._layers, self._by_module, self._model, self._scope = [], [], {}, None, []
        self._micro, self._fallback_params = [], []

    def _drop(self, layer: _Layer) -> None:
        """Take ``layer`` out of the selection (its hooks stay, doing nothing)."""
        layer.clear()
        self._layers.remove(layer)
        del self._by_module[layer.module]
        self._set_scope()

    def _grad_hook(self, p: torch.Tensor) -> None:
        if self.active and p.grad is not None:
            with torch.no_grad():
                g = p.grad
                low = g.dtype in (torch.float16, torch.bfloat16)  # the norm in float32 for 16-bit gradients
                self._grad_sq[id(p)] = torch.linalg.vector_norm(g, dtype=torch.float32 if low else None).double().square()

    def _root_pre_hook(self, module, args, kwargs):
        if not self.active:
            return
        first = next((t for t in args if isinstance(t, torch.Tensor)), None)
        if first is None:
            first = next((t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        self._batch = int(first.shape[0]) if first is not None and first.dim() > 0 else None

    def _forward_hook(self, module, inputs, output):
        if not self.active or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad \
                or _functorch_wrapped(output):  # a torch.func transform of the model is not a training step
            return
        layer = self._by_module.get(module)
        if layer is None or layer.reason is not None:
            return
        layer.calls += 1
        if layer.calls > 1:
            layer.saved = None  # called twice in one forward: the per-call norms do not add up
            return
        if isinstance(layer.saved, _FusedCall):  # the fused backward takes the norms itself
            self._watch_params(layer)
            return
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            layer.reason = f"{layer.rule.name} called without a tensor input"
            return
        if self._cheap and isinstance(layer.rule, _LinearRule) and inputs[0].dim() > 2:
            self._drop(layer)  # positions to sum over: not a cheap layer
            return
        try:
            layer.saved = layer.rule.prepare(module, inputs[0].detach(), output, self._batch)
        except _Unsupported as e:
            layer.reason = str(e)
            return
        self._watch_params(layer)
        node = output.grad_fn
        if node is not None:  # a pre-hook on the node that made the output: its gradient, before any later
            node.register_prehook(partial(self._node_grad, layer, output.output_nr))  # in-place op's
        else:
            output.register_hook(partial(self._output_grad, layer))

    @staticmethod
    def _watch_params(layer: _Layer) -> None:
        if not layer.checked:  # the first backward checks the split against the parameters' own gradients
            for pname, p in layer.params:
                layer.leaf_handles.append(p.register_hook(_store_into(layer.leaf, pname)))

    def _node_grad(self, layer: _Layer, nr: int, grad_outputs) -> None:
        grad = grad_outputs[nr]
        if grad is not None:
            self._output_grad(layer, grad)

    def _output_grad(self, layer: _Layer, grad: torch.Tensor) -> None:
        x = layer.saved
        if x is None or layer.calls != 1:
            return
        layer.saved = None
        if torch.is_grad_enabled():  # a backward with create_graph=True: the norms need no graph
            with torch.no_grad():
                self._norms(layer, x, grad)
        else:
            self._norms(layer, x, grad)

    def _norms(self, layer: _Layer, x, grad: torch.Tensor) -> None:
        layer.n = grad.shape[0]
        layer.sq = layer.rule.sq_norms(layer.module, x, grad, self.max_examples or layer.n)
        if not layer.checked:
            layer.contrib = layer.rule.batch_grads(layer.module, x, grad)
