"""The per-example monitor's step: the recorded backward(s) of a step turned into one ``(|G|², tr(Σ))``
estimate (:class:`~batchpilot.noise.per_example.PerExampleNoiseScale`'s second part).

With ``g_i`` example ``i``'s gradient (its loss the mean over its ``u_i`` units) and ``G_B`` the batch
gradient, ``E|g_i|² = |G|² + tr(Σ)/u_i`` and ``E|G_B|² = |G|² + tr(Σ)/U``: McCandlish et al. (2018,
Appendix A)'s two batch sizes with the smaller one a single example
(:func:`~batchpilot.noise.microbatch.two_batch_estimates`). The first backward of every layer checks
that its per-example gradients sum to the gradient its parameters received.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from batchpilot.errors import BatchpilotError
from batchpilot.noise.microbatch import two_batch_estimates
from batchpilot.noise.per_example_layers import _Layer, _Micro


class _Step:
    """Mixin of :class:`~batchpilot.noise.per_example.PerExampleNoiseScale`: recording a step's
    backward passes and ending the step (its state is made in that class's ``__init__``)."""

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
