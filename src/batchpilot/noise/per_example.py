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

``fused=True`` (:mod:`batchpilot.noise.fused_layers`): the sequence ``nn.Linear``/``Conv1D`` layers run
their own op inside a custom autograd Function whose backward builds the per-example weight gradients
(one batched matmul, Opacus-style expanded weights) *instead of* autograd's weight gradient and returns
their sum, so the norms cost a sum and a norm rather than a second weight gradient. Outputs stay
bit-identical; the gradients equal autograd's up to float rounding (another summation order).

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
from typing import Callable

import torch
from torch import nn

from batchpilot.errors import BatchpilotError
from batchpilot.noise.microbatch import GradientNoiseScale, NoiseEstimate
from batchpilot.noise.per_example_hooks import _Hooks
from batchpilot.noise.per_example_layers import LayerSelection, _Layer, _Micro, _selector
from batchpilot.noise.per_example_step import _Step

# The names this module held before its hooks, its step and its building blocks moved out (one module
# each: per_example_hooks, per_example_step, per_example_layers), still importable from here.
from batchpilot.noise.conv_rule import _ConvRule  # noqa: E402,F401
from batchpilot.noise.layer_rules import (NORM_TYPES, _EmbeddingRule, _LinearRule, _NormRule, _Rule,  # noqa: E402,F401
                                          _Unsupported)
from batchpilot.noise.microbatch import two_batch_estimates  # noqa: E402,F401
from batchpilot.noise.per_example_layers import (_LINEAR, _LINEAR_T, _RULES, _functorch_wrapped,  # noqa: E402,F401
                                                 _own_params, _store_into, rule_for)


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


class PerExampleNoiseScale(_Hooks, _Step):
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
        fused: let each sequence ``nn.Linear``/``Conv1D`` (input ``(N, T, d)``, where the hooks would take
            the per-example product) compute its per-example weight gradients in its own backward, *instead
            of* autograd's weight gradient, and return their sum (:mod:`batchpilot.noise.fused_layers`):
            the norms then cost a sum and a norm, not a second weight gradient. The layers' forwards are
            swapped for the fused ones while attached (restored by :meth:`detach`); the outputs stay
            bit-identical, the weight gradients equal autograd's up to float rounding (another summation
            order). Off by default.
        max_examples: compute the norms of the first ``max_examples`` examples of each micro-batch only
            (``None``: all). Any subset of a shuffled batch keeps both terms unbiased (the batch
            gradient still comes from the whole batch); the hooks' cost scales with the subset.
        ema_decay, window, confidence, bootstrap_samples, seed: as for
            :class:`~batchpilot.noise.microbatch.GradientNoiseScale`.
    """

    needs_accumulation = False

    def __init__(self, model: nn.Module | Callable[[], nn.Module] | None = None, *, layers: LayerSelection = None,
                 loss_scale: float = 1.0, fallback: bool = True, max_examples: int | None = None,
                 grad_hooks: bool = False, fused: bool = False,
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
        self.fused = bool(fused)
        if self.fused and layers == "cheap":
            raise BatchpilotError("fused=True with layers='cheap': the cheap layers have no positions to sum over, "
                                  "so there is nothing to fuse (drop one of the two)")
        self._fused_modules: list[nn.Module] = []
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

    # -- reading -------------------------------------------------------------------------------------------
    def estimate(self, recent: int | None = None) -> PerExampleEstimate:
        """The smoothed B_simple with its bootstrap interval and what it covered (finishes a pending step);
        ``recent``: over the last that many observed steps only (see
        :meth:`batchpilot.noise.microbatch.GradientNoiseScale.estimate`)."""
        self.end_step()
        base = self.monitor.estimate(recent)
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
