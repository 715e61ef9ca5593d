"""The gradient noise scale from per-example gradient norms: at any batch, without accumulation.

McCandlish et al. (2018, Appendix A) estimate B_simple = tr(Σ)/|G|² from gradient norms at two batch
sizes. The smallest batch is one example: with ``g_i`` the gradient of example ``i``'s loss (the mean
over its ``u_i`` units) and ``G_B`` the batch gradient that the ordinary backward leaves in ``p.grad``,

    E|g_i|²  = |G|² + tr(Σ)/u_i        E|G_B|² = |G|² + tr(Σ)/U        (U = Σ u_i)

so :func:`batchpilot.noise.microbatch.two_batch_estimates` with "micro-batches" of one example each
gives unbiased |G|² and tr(Σ) at every step, from one process and without accumulation. With equal
units the pair is the sample statistics of the batch: ``tr(Σ) = u Σ|g_i - Ḡ|²/(N-1)``,
``|G|² = |Ḡ|² - tr(Σ)/U``. Smoothing (separate EMAs of numerator and denominator) and the bootstrap
interval are :class:`~batchpilot.noise.microbatch.GradientNoiseScale`'s, fed through
:meth:`~batchpilot.noise.microbatch.GradientNoiseScale.add_estimate`.

The per-example norms come from hooks, with no extra backward and no per-sample gradient of the
whole model (Goodfellow 2015; Li et al. 2022 "ghost clipping"; Gray et al. 2023/2024). A forward
hook keeps each supported layer's input ``x`` (which the layer's own backward keeps anyway); a
pre-hook on the autograd node that produced its output receives ``δ = ∂loss/∂output`` during the
normal backward. Per example ``i`` (``t, s`` run over positions: tokens, conv outputs):

* ``nn.Linear`` (and transformers' ``Conv1D``), input ``(N, d_in)``: ``|x_i|²|δ_i|²`` (+ ``|δ_i|²`` for
  the bias). Input ``(N, T, d_in)``: ``Σ_{t,s} (x_t·x_s)(δ_t·δ_s)`` (the Gram form, ``T²(d_in+d_out)``
  per example) or ``|Σ_t δ_t x_tᵀ|²`` (the layer's per-example gradient, ``T d_in d_out``, built a chunk
  of examples at a time), whichever costs fewer operations; bias ``|Σ_t δ_t|²``.
* ``nn.Conv1d/2d``: the same two forms on the input slice of each kernel offset (the columns of
  im2col, without building im2col), per group.
* ``nn.Embedding`` (index input ``(N, T)``): ``Σ_{t,s: id_t = id_s} δ_t·δ_s`` or a per-example
  scatter into ``(vocab, dim)``, whichever is cheaper; the padding index gets no gradient.
* ``nn.LayerNorm``/``nn.RMSNorm``: ``|Σ_t δ_t ⊙ x̂_t|²`` (weight) and ``|Σ_t δ_t|²`` (bias), with the
  normalised input ``x̂`` taken from the layer's output where that is exact (see :class:`_NormRule`).

The hooks see the loss as the caller scaled it. batchpilot's trainer divides the summed loss by the
step's total units ``U`` (times ``loss_scale``), so the hooks' per-example gradient is
``(loss_scale/U)·u_i·g_i``; the monitor undoes exactly that factor (``loss = mean over a batch`` is the
case ``u_i = 1``, ``U = N``: the hook's per-example gradient is ``g_i/N``).

A parameter whose gradient does not come entirely from one call of its supported layer cannot be
split by the layer's hooks: a tied weight (an embedding reused as the output head), a weight also
used outside the module or in a loss term, a layer called twice in one forward, an input whose first
dimension is not the batch (a position table indexed by ``arange(T)``). The first backward of every
layer checks that the sum of its per-example gradients equals the gradient the parameter received;
layers that fail, and parameters of layers the hooks do not know (attention's packed projections,
BatchNorm, custom modules), *fall back*: under gradient accumulation they get the micro-batch
estimator (their |G|² and tr(Σ) add to the per-example ones, both being sums over parameters);
without it they are left out. :class:`PerExampleEstimate` lists both.

The cheap modes: ``layers=`` (``"norm"``, ``"cheap"``, or any selection) estimates tr(Σ_S)/|G_S|² over
the selected layers' parameters only, a different quantity from the full B_simple, whose agreement
with it is a measurement (``docs/noise.md``), not an identity; ``max_examples=m`` takes the norms of m
examples of each batch (both terms stay unbiased, the estimate gets noisier).

BatchNorm in training mode couples the examples of a batch: per-example gradients (and the
micro-batch estimator's independent micro-batches) are then approximations; the estimate says so.
"""


from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, NamedTuple, Sequence, Union

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from batchpilot.errors import BatchpilotError
from batchpilot.noise.conv_rule import _ConvRule
from batchpilot.noise.layer_rules import NORM_TYPES, _EmbeddingRule, _LinearRule, _NormRule, _Rule, _Unsupported
from batchpilot.noise.microbatch import GradientNoiseScale, NoiseEstimate, two_batch_estimates

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



# -- the estimate ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PerExampleEstimate(NoiseEstimate):
    """:class:`~batchpilot.noise.microbatch.NoiseEstimate` plus what the per-example norms covered.

    Attributes:
        method: ``per-example``, or ``per-example+micro-batches`` when fallback parameters were
            measured from the micro-batches of gradient accumulation at the last step.
        scope: ``all`` (every trainable parameter) or ``layers`` (a selection: the cheap mode).
        layers: modules whose per-example norms entered the last step.
        covered_fraction: share of the in-scope parameters (elements with a gradient) at the last
            step that the per-example norms covered.
        fallback: ``"module: reason"`` for each module the hooks could not split.
        excluded: parameters with a gradient whose noise the last step's estimate left out (fallback
            parameters without gradient accumulation).
        excluded_fraction: their share of the in-scope parameter elements.
        caveats: notes on the estimate's assumptions (BatchNorm in training mode).
    """

    method: str = "per-example"
    scope: str = "all"
    layers: int = 0
    covered_fraction: float = float("nan")
    fallback: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    excluded_fraction: float = 0.0
    caveats: tuple[str, ...] = ()


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


class PerExampleNoiseScale:
    """B_simple from per-example gradient norms taken by hooks, at every step, at any batch.

    In a loop of your own (one backward per step; the loss a mean over the batch, or over its units)::

        monitor = PerExampleNoiseScale(model)        # registers the hooks
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)      # mean over the batch
            loss.backward()
            monitor.observe()                        # or observe(units=tokens per example)
            optimizer.step(); optimizer.zero_grad()
        print(monitor.estimate())                    # B_simple in examples (or units)
        monitor.detach()                             # removes every hook

    Under gradient accumulation call :meth:`after_micro` after each micro-batch's backward (the
    signature of :func:`batchpilot.train.accumulate_gradients`' hook, whose loss normalisation it
    assumes: each micro loss summed over units and divided by the step's total units). With the
    reference trainer it is ``Trainer(..., noise=PerExampleNoiseScale())``.

    The monitor reads inputs, output gradients and ``p.grad``; it never writes to them, and the
    hooks return nothing, so the model's outputs and gradients are those of a run without it.

    Args:
        model: the module to hook (or later :meth:`attach`; a zero-argument callable returning the
            module is resolved at the first :meth:`after_micro`, and the hooks serve from the next step).
        layers: which supported layers to hook: ``None``/``"all"``; ``"norm"`` (LayerNorm/RMSNorm);
            ``"cheap"`` (the layers whose norms cost ``O(N·(d_in + d_out))``: the norm layers and the
            linear layers whose input is ``(N, d)``, without positions to sum over); module names or
            classes; or a predicate ``f(name, module)``. Outside the selection nothing is hooked and
            nothing is counted (the estimate is B_simple of the selected parameters).
        loss_scale: the factor the loss was multiplied by on top of the division by the step's total
            units (batchpilot's DDP path multiplies by the world size; a summed loss is ``U``).
        fallback: measure parameters that the hooks cannot split with the micro-batch estimator
            when gradient accumulation gives two batch sizes (else they are left out and reported).
        grad_hooks: read each parameter's accumulated gradient norm inside the backward
            (post-accumulate-grad hooks) instead of from ``p.grad`` at :meth:`after_micro`: for loops
            that clip or unscale ``p.grad`` before the monitor is called (the Hugging Face Trainer
            clips before its last callback of a step). Call :meth:`end_step` after a step's last
            :meth:`after_micro` then (the callbacks do).
        max_examples: compute the norms of the first ``max_examples`` examples of each micro-batch only
            (``None``: all). Any subset of a shuffled batch keeps both terms unbiased (the batch
            gradient still comes from the whole batch); the hooks' cost scales with the subset.
        ema_decay, window, confidence, bootstrap_samples, seed: as for
            :class:`~batchpilot.noise.microbatch.GradientNoiseScale`.
    """

    needs_accumulation = False

    def __init__(self, model: nn.Module | Callable[[], nn.Module] | None = None, *, layers: LayerSelection = None,
                 loss_scale: float = 1.0, fallback: bool = True, max_examples: int | None = None,
                 grad_hooks: bool = False,
                 ema_decay: float = 0.95, window: int | None = None, confidence: float = 0.8,
                 bootstrap_samples: int = 200, seed: int = 0) -> None:
        if not (isinstance(loss_scale, (int, float)) and loss_scale > 0 and math.isfinite(loss_scale)):
            raise BatchpilotError(f"loss_scale must be a positive number, got {loss_scale!r}")
        self.monitor = GradientNoiseScale(ema_decay=ema_decay, window=window, confidence=confidence,
                                          bootstrap_samples=bootstrap_samples, seed=seed)
        if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                         or max_examples < 2):
            raise BatchpilotError(f"max_examples must be an integer >= 2 or None, got {max_examples!r}")
        self.loss_scale, self.use_fallback, self.max_examples = float(loss_scale), bool(fallback), max_examples
        self.scope = "all" if layers is None or layers == "all" else "layers"
        self._select = _selector(layers)
        self._fallback_monitor = GradientNoiseScale(params=lambda: self._fallback_params, ema_decay=ema_decay)
        self._fallback_params: list[torch.Tensor] = []
        self.grad_hooks = bool(grad_hooks)
        self._grad_sq: dict[int, torch.Tensor] = {}  # id(p) -> |p.grad|² after its latest backward (grad_hooks)
        self._model: nn.Module | None = None
        self._source = None
        self._handles: list = []
        self._layers: list[_Layer] = []
        self._by_module: dict[nn.Module, _Layer] = {}
        self._scope: list[tuple[str, torch.Tensor]] = []
        self._cheap = layers == "cheap"
        self.active = True
        """While ``False`` the hooks return at once (nothing saved, no norms): a caller that observes only
        some steps sets it before each step's forward, so the steps it skips cost nothing."""
        self._batch: int | None = None
        self._micro: list[_Micro] = []
        self._broken = False  # a micro-batch of this step went unrecorded: the step is skipped
        self._last_micros = 0  # backward passes in the last recorded step (1: no accumulation)
        self._accumulating = True
        self._coverage: dict = {}
        self._last_info: dict = {}
        self.last_norms: dict[str, torch.Tensor] = {}
        """Per-example squared norms of the last backward, per module name, of the loss as scaled (read-only)."""
        if model is not None:
            self.attach(model)

    # -- hooks ---------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module | Callable[[], nn.Module]) -> "PerExampleNoiseScale":
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
        self._handles.append(model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        if self.grad_hooks:
            for p in root.parameters():
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook))
        for name, m in root.named_modules():
            rule = rule_for(m)
            if rule is None or not _own_params(m) or not self._select(name, m):
                continue
            layer = _Layer(name, m, rule)
            self._layers.append(layer)
            self._by_module[m] = layer
            self._handles.append(m.register_forward_hook(self._forward_hook))
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
        if not layer.checked:  # the first backward checks the split against the parameters' own gradients
            for pname, p in layer.params:
                layer.leaf_handles.append(p.register_hook(_store_into(layer.leaf, pname)))
        node = output.grad_fn
        if node is not None:  # a pre-hook on the node that made the output: its gradient, before any later
            node.register_prehook(partial(self._node_grad, layer, output.output_nr))  # in-place op's
        else:
            output.register_hook(partial(self._output_grad, layer))

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

    # -- the step ------------------------------------------------------------------------------------------
    def _resolve_source(self) -> bool:
        """Resolve an attached callable; ``True`` when it installed hooks on a new model just now."""
        if self._source is None:
            return False
        model = self._source()
        if model is None:
            raise BatchpilotError("PerExampleNoiseScale: the attached callable returned None (is the model built yet?)")
        if model is self._model:
            return False
        self._install(model)  # hooks from now on: this step's backward is already done
        return True

    def after_micro(self, index: int, units: int | float | Sequence[float] | torch.Tensor | None = None) -> None:
        """Record micro-batch ``index``'s backward (the trainer's hook; ``index`` 0 ends the previous step).

        ``units``: the micro-batch's loss units (split equally over its examples), or one count per
        example, or ``None`` (one unit per example). Call it before the gradients are zeroed.
        """
        if index == 0:
            self.end_step()
            self._accumulating = self._last_micros != 1  # the fallback snapshots only while steps accumulate
            self._broken = False
            if self._resolve_source():  # hooked only now: nothing of this step was seen
                self._broken = True
                return
        micro_units = self._record(index, units)
        if self.use_fallback and micro_units is not None and self._accumulating:
            if index == 0:
                self._fallback_params = self._coverage["fallback"]
            if self._fallback_params:
                self._fallback_monitor.after_micro(index, max(1, round(micro_units)))

    def observe(self, units: int | float | Sequence[float] | torch.Tensor | None = None) -> tuple[float, float] | None:
        """One step of one backward: record it and add its estimate; returns ``(g_sq, trace_sigma)`` or ``None``."""
        self.after_micro(0, units)
        return self.end_step()

    def _record(self, index: int, units) -> float | None:
        """Collect this backward's per-example norms; returns the micro-batch's units (``None``: not recorded)."""
        sq: dict[_Layer, torch.Tensor] = {}
        n = self._batch
        n_call = 0
        for la in self._layers:
            if not (la.calls or la.sq is not None or la.leaf_handles):
                continue
            if la.reason is None and la.calls > 1:
                la.reason = f"{la.rule.name} called {la.calls} times in one forward"
            if la.reason is None and la.sq is not None:
                if n is not None and la.n != n:
                    la.reason = f"{la.rule.name} saw {la.n} examples, the model's input {n}"
                elif not la.checked:
                    self._check(la)
                if la.reason is None:
                    sq[la], n_call = la.sq, la.n
            la.clear()
        self.last_norms = {la.name: v for la, v in sq.items()}
        if self._broken or len(self._micro) != index or not sq:
            self._broken, self._micro = True, []
            return None
        key = tuple(sq)
        if index > 0 and key != self._micro[0].layers:  # a layer came or went within the step
            self._broken, self._micro = True, []
            return None
        vals = list(sq.values())
        m = vals[0].shape[0]
        per_ex = vals[0] if len(vals) == 1 else torch.stack(vals).sum(0)
        if units is None or (isinstance(units, (int, float)) and not isinstance(units, bool)):
            each = 1.0 if units is None else float(units) / n_call
            if not each > 0:
                raise BatchpilotError(f"a micro-batch needs a positive number of loss units, got {units!r}")
            u, total = each, each * n_call
        else:
            u = torch.as_tensor(units, dtype=torch.float64).reshape(-1).cpu()
            if u.shape[0] != n_call:
                raise BatchpilotError(f"got {u.shape[0]} per-example unit counts for a micro-batch of {n_call} examples")
            if not bool((u > 0).all()):
                raise BatchpilotError("every example needs a positive number of loss units")
            u, total = u[:m], float(u.sum())
        if key != self._coverage.get("key"):
            self._cover(key)
        grads = [p.grad for p in self._coverage["params"] if p.grad is not None]
        if self.grad_hooks:
            sq_list = [self._grad_sq[id(p)] for p in self._coverage["params"] if id(p) in self._grad_sq]
            big = torch.stack(sq_list).sum().sqrt() if sq_list else None
        else:
            big = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None
        self._micro.append(_Micro(key, per_ex, m, u, total, big))
        return total

    def _cover(self, key: tuple) -> None:
        """What the layers ``key`` cover of the parameters in scope (recomputed when the layers change)."""
        params = [p for la in key for _, p in la.params]
        cov = {id(p) for p in params}
        with_grad = [(k, p) for k, p in self._scope if p.grad is not None]
        total = sum(p.numel() for _, p in with_grad) or 1
        out = [(k, p) for k, p in with_grad if id(p) not in cov]
        self._coverage = {"key": key, "params": params, "fallback": [p for _, p in out],
                          "covered_fraction": 1 - sum(p.numel() for _, p in out) / total,
                          "uncovered": tuple(k for k, _ in out), "uncovered_fraction": sum(p.numel() for _, p in out) / total}

    def _check(self, la: _Layer) -> None:
        """Compare the sum of the per-example gradients with each parameter's gradient of this backward."""
        la.checked = True
        contrib = la.contrib or {}
        for pname, p in la.params:
            got, ref = contrib.get(pname), la.leaf.get(pname)
            if ref is None or got is None:
                continue
            ref = ref.to(got.dtype)
            # 16-bit gradients are sums rounded at 2^-8 (bf16): only a gross mismatch is a verdict there
            tol = 1e-3 if p.dtype in (torch.float32, torch.float64) else 0.25
            err = float(torch.linalg.vector_norm(got - ref))
            scale = float(torch.linalg.vector_norm(ref)) + float(torch.linalg.vector_norm(got))
            if err > tol * scale + 1e-30:
                la.reason = (f"{la.rule.name}.{pname} gets gradient from outside this call (tied or shared "
                             f"weight, functional use, or a loss term): {err / max(scale, 1e-30):.2g} of it")
                return

    def end_step(self) -> tuple[float, float] | None:
        """Turn the recorded backward(s) of the current step into one estimate (the next
        :meth:`after_micro` with index 0 does it too). Returns ``(g_sq, trace_sigma)``, or ``None``
        when nothing (or only part of the step) was recorded, or the step had fewer than two examples."""
        micro, self._micro = self._micro, []
        if micro:
            self._last_micros = len(micro)
            self._grad_sq = {}  # (a step already ended keeps the next step's first backward's norms)
        fb = self._fallback_monitor.end_step() if self.use_fallback else None
        if not micro or self._broken or micro[-1].big is None:
            return None
        total = sum(mi.total for mi in micro)  # U: all the step's units
        count = sum(mi.m for mi in micro)  # examples with norms
        if count < 2:
            return None
        # The hooks saw the gradient of (loss_scale / U) · Σ_i u_i · loss_i (loss_i the mean over example i's
        # units), so example i's gradient g_i is the hook's divided by c_i = loss_scale · u_i / U.
        # small: mean over the examples of |g_i|²; inv: mean of 1/u_i (two_batch_estimates' 1/b_small).
        small = inv = 0.0
        for mi in micro:
            if isinstance(mi.u, float):
                c = self.loss_scale * mi.u / total
                small += float(mi.per_ex.sum(dtype=torch.float64)) / c**2
                inv += mi.m / mi.u
            else:
                c = (self.loss_scale / total) * mi.u.to(mi.per_ex.device)
                small += float((mi.per_ex.double() / c.square()).sum())
                inv += float((1.0 / mi.u).sum())
        small, inv = small / count, inv / count
        big = float(micro[-1].big) ** 2 / self.loss_scale**2  # p.grad after the last backward
        if not inv > 1.0 / total:
            return None
        g_sq, trace_sigma = two_batch_estimates([small], big, [1.0 / inv], total)
        if not (math.isfinite(g_sq) and math.isfinite(trace_sigma)):
            return None
        cov = self._coverage
        if fb is not None:
            g_sq, trace_sigma = g_sq + fb[0], trace_sigma + fb[1]
        self._last_info = {
            "method": "per-example+micro-batches" if fb is not None else "per-example",
            "layers": len(micro[0].layers),
            "covered_fraction": cov["covered_fraction"],
            "excluded": () if fb is not None else cov["uncovered"],
            "excluded_fraction": 0.0 if fb is not None else cov["uncovered_fraction"],
        }
        return self.monitor.add_estimate(g_sq, trace_sigma)

    # -- reading -------------------------------------------------------------------------------------------
    def estimate(self) -> PerExampleEstimate:
        """The smoothed B_simple with its bootstrap interval and what it covered (finishes a pending step)."""
        self.end_step()
        base = self.monitor.estimate()
        caveats = ()
        root = self._model
        if root is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in root.modules()):
            caveats = ("BatchNorm in training mode couples the examples of a batch: per-example gradients "
                       "are approximate",)
        return PerExampleEstimate(**base.to_dict(), scope=self.scope, fallback=self.fallback_layers(),
                                  caveats=caveats, **self._last_info)

    def fallback_layers(self) -> tuple[str, ...]:
        """``"module: reason"`` for every hooked module the per-example norms could not split."""
        return tuple(f"{la.name or '<root>'}: {la.reason}" for la in self._layers if la.reason is not None)

    @property
    def n_updates(self) -> int:
        """Steps observed so far."""
        return self.monitor.n_updates

    @property
    def history(self) -> list[tuple[float, float]]:
        """Per-step ``(g_sq, trace_sigma)`` estimates, oldest first."""
        return self.monitor.history

    def reset(self) -> None:
        """Forget every observation (the hooks stay)."""
        self.monitor.reset()
        self._fallback_monitor.reset()
        self._micro, self._last_info, self._coverage = [], {}, {}

    def state_dict(self) -> dict:
        """The smoothed state as plain data, for a checkpoint (a pending step is finished first)."""
        self.end_step()
        return {**self.monitor.state_dict(), "method": "per-example"}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (the hooks stay; a step in progress is dropped)."""
        self.monitor.load_state_dict(state)
        self._fallback_monitor.reset()
        self._micro, self._broken = [], False
        for la in self._layers:
            la.clear()


_IS_WRAPPED = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def _functorch_wrapped(t: torch.Tensor) -> bool:
    return bool(_IS_WRAPPED(t)) if _IS_WRAPPED is not None else False


def _store_into(store: dict, key: str):
    def hook(grad: torch.Tensor) -> None:
        store[key] = grad.detach().clone()  # the parameter's gradient of this backward, from every use

    return hook
