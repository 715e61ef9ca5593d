"""The gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, "An Empirical Model
of Large-Batch Training", Appendix A), measured for free from micro-batches.

For a gradient estimate ``G_b`` from ``b`` i.i.d. units, ``E|G_b|² = |G|² + tr(Σ)/b``. Two batch
sizes ``b_small < b_big`` then give unbiased estimates of both terms (their eq. A.2)::

    |G|²  ≈ (b_big |G_big|² - b_small |G_small|²) / (b_big - b_small)
    tr(Σ) ≈ (|G_small|² - |G_big|²) / (1/b_small - 1/b_big)

During gradient accumulation each micro-batch is a small batch and the accumulated gradient is
the big one. With micro-batches of unequal sizes ``b_i`` (ragged batches, token counts), the
mean of ``|G_i|²`` has expectation ``|G|² + tr(Σ)·mean(1/b_i)``, so ``1/b_small`` becomes the
mean of ``1/b_i`` and the estimators stay unbiased.

The per-step estimates are very noisy (|G|² can come out negative), so, as McCandlish et al.
advise, the numerator and the denominator are smoothed *separately* with exponential moving
averages (bias-corrected as in Adam) and B_simple is their ratio. The spread is a bootstrap
over the recent per-step pairs, weighted like the EMAs. The monitor only reads ``p.grad``; it never modifies it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence, Union

import numpy as np
import torch
from torch import nn

from batchpilot.errors import BatchpilotError

ParamSource = Union[nn.Module, Iterable[torch.Tensor], Callable[[], object]]


@dataclass(frozen=True)
class NoiseEstimate:
    """The smoothed noise scale and its spread, in the units the monitor was fed (samples or tokens).

    Attributes:
        b_simple: tr(Σ)/|G|² from the bias-corrected EMAs (``nan`` before two steps, ``inf`` when
            the smoothed |G|² is not positive: the gradient is lost in the noise).
        g_sq: smoothed estimate of |G|², the squared norm of the true gradient.
        trace_sigma: smoothed estimate of tr(Σ), the per-unit gradient variance.
        b_simple_low: lower end of the bootstrap interval (``confidence`` two-sided).
        b_simple_high: upper end (``inf`` when the resampled |G|² reaches zero).
        confidence: coverage of ``[b_simple_low, b_simple_high]``.
        n_updates: optimizer steps (two-batch pairs) observed.
        window: how many recent steps the bootstrap resampled.
    """

    b_simple: float
    g_sq: float
    trace_sigma: float
    b_simple_low: float
    b_simple_high: float
    confidence: float
    n_updates: int
    window: int

    @property
    def relative_spread(self) -> float:
        """``(high - low) / (2 b_simple)``: the half-width of the interval relative to the point."""
        if not (self.b_simple > 0 and math.isfinite(self.b_simple)):
            return float("nan")
        return (self.b_simple_high - self.b_simple_low) / (2 * self.b_simple)

    def to_dict(self) -> dict:
        """Plain data."""
        return asdict(self)


def grad_sq_norm(params: Iterable[torch.Tensor]) -> float:
    """Σ |p.grad|² over ``params`` (parameters without a gradient count as zero), in float64."""
    grads = [p.grad for p in params if p.grad is not None]
    return _sq_norm(grads) if grads else 0.0


def _sq_norm(tensors: Sequence[torch.Tensor]) -> float:
    """Σ |t|² in float64 (one host sync per device)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for n in torch._foreach_norm(list(tensors)):
        by_device.setdefault(n.device, []).append(n.double())
    return sum(float(torch.stack(ns).square().sum()) for ns in by_device.values())


def two_batch_estimates(
    small_sq_norms: Sequence[float], big_sq_norm: float, small_batch: int | Sequence[int], big_batch: int
) -> tuple[float, float]:
    """Unbiased (|G|², tr(Σ)) from small-batch and big-batch gradient norms (McCandlish et al. 2018, A.2).

    Args:
        small_sq_norms: |G_i|² of each small-batch gradient, each the *mean* over its units.
        big_sq_norm: |G_big|² of the big-batch (mean) gradient.
        small_batch: units in each small batch (one int for all, or one per norm).
        big_batch: units in the big batch.

    Returns:
        ``(g_sq, trace_sigma)``.

    Raises:
        BatchpilotError: on empty input, non-positive sizes, or ``small_batch >= big_batch``.
    """
    k = len(small_sq_norms)
    if k == 0:
        raise BatchpilotError("two-batch estimate needs at least one small-batch norm")
    sizes = [small_batch] * k if isinstance(small_batch, (int, np.integer)) else list(small_batch)
    if len(sizes) != k:
        raise BatchpilotError(f"got {k} small-batch norms but {len(sizes)} small-batch sizes")
    if any(b <= 0 for b in sizes) or big_batch <= 0:
        raise BatchpilotError(f"batch sizes must be positive, got small {sizes}, big {big_batch}")
    inv_small = sum(1.0 / b for b in sizes) / k
    inv_big = 1.0 / big_batch
    if not inv_small > inv_big:
        raise BatchpilotError(f"the small batches ({sizes}) must be smaller than the big batch ({big_batch})")
    small_mean = sum(float(s) for s in small_sq_norms) / k
    trace_sigma = (small_mean - big_sq_norm) / (inv_small - inv_big)
    g_sq = big_sq_norm - trace_sigma * inv_big
    return g_sq, trace_sigma


class _BiasCorrectedEMA:
    """Adam-style EMA: ``m = d·m + (1-d)·x``, read as ``m / (1 - d^t)``."""

    def __init__(self, decay: float) -> None:
        self.decay, self.value, self.count = decay, 0.0, 0

    def update(self, x: float) -> None:
        self.value = self.decay * self.value + (1 - self.decay) * x
        self.count += 1

    def read(self) -> float:
        return self.value / (1 - self.decay**self.count) if self.count else float("nan")


class _Snapshot:
    """A copy of the gradients in one flat buffer per (device, dtype), with views matching each gradient."""

    def __init__(self, grads: Sequence[torch.Tensor]) -> None:
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, g in enumerate(grads):
            groups.setdefault((g.device, g.dtype), []).append(i)
        self.shapes = [(g.shape, g.dtype, g.device) for g in grads]
        self.groups = []
        for (device, dtype), idx in groups.items():
            flat = torch.empty(sum(grads[i].numel() for i in idx), device=device, dtype=dtype)
            views = [v.view(grads[i].shape) for v, i in zip(flat.split([grads[i].numel() for i in idx]), idx)]
            self.groups.append((idx, flat, views))

    def matches(self, grads: Sequence[torch.Tensor]) -> bool:
        return len(grads) == len(self.shapes) and all(
            (g.shape, g.dtype, g.device) == s for g, s in zip(grads, self.shapes))

    def _sq(self) -> torch.Tensor:
        """Squared norm of the snapshot as a 0-d tensor on the first buffer's device (no host sync)."""
        total = None
        for _, flat, _ in self.groups:
            if flat.dtype in (torch.float32, torch.float64):
                part = torch.dot(flat, flat)
            else:  # half precision: accumulate in float32
                part = torch.linalg.vector_norm(flat, dtype=torch.float32).square()
            total = part if total is None else total + part.to(total.device)
        return total

    def copy_from(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Copy ``grads`` in; returns their squared norm (a 0-d tensor)."""
        for idx, _, views in self.groups:
            torch._foreach_copy_(views, [grads[i] for i in idx])
        return self._sq()

    def diff_sq_and_copy(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """|grads - snapshot|², then copy ``grads`` in."""
        for idx, _, views in self.groups:
            torch._foreach_sub_(views, [grads[i] for i in idx])  # snapshot <- snapshot - now = -delta, in place
        out = self._sq()
        for idx, _, views in self.groups:
            torch._foreach_copy_(views, [grads[i] for i in idx])
        return out

    def sq_norm(self) -> float:
        return float(self._sq())


class GradientNoiseScale:
    """Estimate B_simple from the micro-batch gradients of gradient accumulation.

    With the reference trainer::

        monitor = GradientNoiseScale()
        trainer = Trainer(workload, config, after_micro=monitor.after_micro)  # accumulation_steps >= 2
        monitor.attach(lambda: trainer.model)   # the trainer builds its model inside run()
        trainer.run()
        print(monitor.estimate().b_simple)

    In a loop of your own, either call :meth:`after_micro` after each micro-batch's backward
    (the gradient must be zeroed before micro-batch 0, and each micro loss divided by the
    global batch's unit count, as in :func:`batchpilot.train.accumulate_gradients`), or compute
    the norms yourself and call :meth:`update`.

    Args:
        params: a module, an iterable of parameters, or a zero-argument callable returning either
            (resolved at every micro-batch 0). May be given later with :meth:`attach`.
        ema_decay: decay of the two EMAs (0.95 averages over about 20 steps).
        window: recent steps kept for the bootstrap spread (default ``ceil(3 / (1 - ema_decay))``, which
            holds 95% of the EMA's weight).
        confidence: two-sided coverage of the reported interval.
        bootstrap_samples: resamples for the spread.
        seed: seed of the bootstrap's private NumPy generator (the global RNGs are never touched).
        every: observe one optimizer step in ``every`` (the others cost nothing); the EMAs then
            average over ``every`` times as many training steps.
    """

    def __init__(
        self,
        params: ParamSource | None = None,
        *,
        ema_decay: float = 0.95,
        window: int | None = None,
        confidence: float = 0.8,
        bootstrap_samples: int = 200,
        seed: int = 0,
        every: int = 1,
    ) -> None:
        if not 0 <= ema_decay < 1:
            raise BatchpilotError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        if not 0 < confidence < 1:
            raise BatchpilotError(f"confidence must be in (0, 1), got {confidence!r}")
        window = window if window is not None else max(2, math.ceil(3 / (1 - ema_decay)))
        if window < 2:
            raise BatchpilotError(f"window must be >= 2, got {window!r}")
        self.ema_decay, self.confidence, self.window = ema_decay, confidence, window
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise BatchpilotError(f"every must be a positive integer, got {every!r}")
        self.bootstrap_samples, self.seed, self.every = bootstrap_samples, seed, every
        self._source = params
        self._params: list[torch.Tensor] = []
        self._resolved_from: nn.Module | None = None
        self.reset()

    # -- state ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every observation (the attached parameters stay attached)."""
        self._g_ema = _BiasCorrectedEMA(self.ema_decay)
        self._s_ema = _BiasCorrectedEMA(self.ema_decay)
        self._recent: deque[tuple[float, float]] = deque(maxlen=self.window)
        self.history: list[tuple[float, float]] = []
        """Every per-step ``(g_sq, trace_sigma)`` estimate, oldest first."""
        self._snap: _Snapshot | None = None
        self._steps_seen = 0
        self._active = True
        self._micro_sq: list[torch.Tensor] = []
        self._micro_units: list[int] = []

    def attach(self, params: ParamSource) -> "GradientNoiseScale":
        """Set the parameters to read (module, iterable, or callable returning one); returns ``self``."""
        self._source = params
        self._params, self._resolved_from = [], None
        return self

    def _resolve(self) -> list[torch.Tensor]:
        src = self._source
        if src is None:
            raise BatchpilotError("GradientNoiseScale has no parameters: pass params=... or call attach(model) first")
        if callable(src) and not isinstance(src, nn.Module):
            src = src()
            if src is None:
                raise BatchpilotError("GradientNoiseScale: the attached callable returned None (is the model built yet?)")
        if isinstance(src, nn.Module):
            if src is self._resolved_from and self._params:
                return self._params  # the same module as last step (walking parameters() costs per step)
            self._resolved_from = src
            src = src.parameters()
        else:
            self._resolved_from = None
        return [p for p in src if p.requires_grad]

    # -- the trainer hook -------------------------------------------------------------------
    @torch.no_grad()
    def after_micro(self, index: int, units: int) -> None:
        """Hook for :func:`batchpilot.train.accumulate_gradients`: record micro-batch ``index``.

        ``p.grad`` holds the accumulated gradient so far, each micro loss divided by the global
        batch's unit count ``T``. Micro-batch ``i`` added ``Δ_i = (b_i/T)·G_i``; it is recovered as
        the difference of consecutive snapshots and rescaled by ``T/b_i`` once ``T = Σ b_i`` is known,
        when the step ends (at the next micro-batch 0, :meth:`end_step` or :meth:`estimate`). The
        snapshot costs one extra copy of the gradients in memory, in one flat buffer per
        (device, dtype) so that each micro-batch costs three kernels per buffer.
        """
        if index == 0:
            self.end_step()
            self._steps_seen += 1
            self._active = (self._steps_seen - 1) % self.every == 0
            if self._active:
                self._params = self._resolve()
        if not self._active:
            return
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return
        if index == 0:
            # micro-batch 0: the gradient was zero before it, so the snapshot is the delta itself
            if self._snap is None or not self._snap.matches(grads):
                self._snap = _Snapshot(grads)
            delta_sq = self._snap.copy_from(grads)
            self._micro_sq, self._micro_units = [], []
        elif self._snap is None or len(grads) != len(self._snap.shapes) or not self._micro_sq:
            # a parameter got its first gradient mid-step (or micro-batch 0 was not seen): the
            # differences no longer add up to this step's gradient, so the step is skipped
            self._micro_sq, self._micro_units = [], []
            self._active = False
            return
        else:
            delta_sq = self._snap.diff_sq_and_copy(grads)
        self._micro_sq.append(delta_sq)
        self._micro_units.append(int(units))

    def end_step(self) -> tuple[float, float] | None:
        """Turn the recorded micro-batches of the current step into one estimate.

        Call it between optimizer steps (the hook does so itself at the next micro-batch 0).
        Returns the step's ``(g_sq, trace_sigma)``, or ``None`` when fewer than two micro-batches
        (no accumulation: no two batch sizes) were recorded.
        """
        sq, units = self._micro_sq, self._micro_units
        self._micro_sq, self._micro_units = [], []
        if len(sq) < 2 or self._snap is None or any(b <= 0 for b in units):
            return None
        total = sum(units)
        small = [float(x) * (total / b) ** 2 for x, b in zip(sq, units)]
        big_sq = self._snap.sq_norm()  # the snapshot after the last micro-batch is the accumulated gradient
        return self.update(small, big_sq, units, total)

    # -- the low-level API ------------------------------------------------------------------
    def update(
        self, small_sq_norms: Sequence[float], big_sq_norm: float, small_batch: int | Sequence[int], big_batch: int
    ) -> tuple[float, float]:
        """Add one step's norms (see :func:`two_batch_estimates`); returns its ``(g_sq, trace_sigma)``."""
        g_sq, trace_sigma = two_batch_estimates(small_sq_norms, big_sq_norm, small_batch, big_batch)
        return self.add_estimate(g_sq, trace_sigma)

    def add_estimate(self, g_sq: float, trace_sigma: float) -> tuple[float, float]:
        """Add one step's unbiased ``(g_sq, trace_sigma)`` however it was measured (two batch sizes here,
        per-example norms in :mod:`batchpilot.noise.per_example`): the EMAs, the bootstrap window and
        :attr:`history` all come from these pairs. Returns the pair."""
        g_sq, trace_sigma = float(g_sq), float(trace_sigma)
        if not (math.isfinite(g_sq) and math.isfinite(trace_sigma)):
            raise BatchpilotError(f"gradient norms are not finite (g_sq={g_sq}, trace_sigma={trace_sigma})")
        self._g_ema.update(g_sq)
        self._s_ema.update(trace_sigma)
        self._recent.append((g_sq, trace_sigma))
        self.history.append((g_sq, trace_sigma))
        return g_sq, trace_sigma

    def state_dict(self) -> dict:
        """The smoothed state as plain data, for a checkpoint (a pending step is finished first)."""
        self.end_step()
        return {"g_ema": [self._g_ema.value, self._g_ema.count], "s_ema": [self._s_ema.value, self._s_ema.count],
                "recent": [list(p) for p in self._recent], "history": [list(p) for p in self.history],
                "steps_seen": self._steps_seen, "ema_decay": self.ema_decay}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (the attached parameters stay as they are)."""
        if float(state.get("ema_decay", self.ema_decay)) != self.ema_decay:
            raise BatchpilotError(f"noise monitor state has ema_decay {state['ema_decay']}, this monitor {self.ema_decay}")
        self.reset()
        self._g_ema.value, self._g_ema.count = float(state["g_ema"][0]), int(state["g_ema"][1])
        self._s_ema.value, self._s_ema.count = float(state["s_ema"][0]), int(state["s_ema"][1])
        self._recent.extend(tuple(float(v) for v in p) for p in state["recent"])
        self.history.extend(tuple(float(v) for v in p) for p in state["history"])
        self._steps_seen = int(state.get("steps_seen", len(self.history)))

    @property
    def n_updates(self) -> int:
        """Steps observed so far."""
        return len(self.history)

    # -- reading ----------------------------------------------------------------------------
    def estimate(self, recent: int | None = None) -> NoiseEstimate:
        """The smoothed B_simple with its bootstrap interval (finalizes a pending step first).

        Args:
            recent: if given, the ratio of the means of the last ``recent`` observed steps' ``tr(Σ)`` and
                ``|G|²`` (equal weights; the interval a bootstrap over those steps) instead of the EMAs
                over all steps. The EMAs weigh by age, not by size: early in training ``|G|²`` falls by
                10–100× within a few dozen steps, and the early steps' large ``|G|²`` keep the EMA ratio
                low long after (charlm at batch 32, every 4th step observed: 7 sequences from the EMA at
                step 80 against 55 from the last 8 observed steps and 28 from a frozen-weight estimate,
                docs/large-batch.md). A window follows a moving noise scale; the EMAs smooth a steady one.
        """
        if self._micro_sq:
            self.end_step()
        if recent is not None:
            if isinstance(recent, bool) or not isinstance(recent, int) or recent < 1:
                raise BatchpilotError(f"recent must be an integer >= 1, got {recent!r}")
            pairs = self.history[-recent:]
            g_sq = sum(p[0] for p in pairs) / len(pairs) if pairs else float("nan")
            trace_sigma = sum(p[1] for p in pairs) / len(pairs) if pairs else float("nan")
            window = len(pairs)
        else:
            pairs = list(self._recent)
            g_sq, trace_sigma = self._g_ema.read(), self._s_ema.read()
            window = len(self._recent)
        low = high = float("nan")
        if len(pairs) >= 2:
            low, high = self._bootstrap(pairs, weighted=recent is None)
        return NoiseEstimate(
            b_simple=_ratio(trace_sigma, g_sq), g_sq=g_sq, trace_sigma=trace_sigma, b_simple_low=low,
            b_simple_high=high, confidence=self.confidence, n_updates=self.n_updates, window=window,
        )

    def _bootstrap(self, recent: Sequence[tuple[float, float]], weighted: bool = True) -> tuple[float, float]:
        """Bayesian bootstrap (Rubin 1981) of the (EMA-weighted) ratio over the recent steps.

        Each resample reweights the recent per-step pairs by Dirichlet(1, ..., 1) draws, on top of the
        EMA's own weights ``decay^age`` when ``weighted``, so the interval is centred on the same
        weighted ratio as the point estimate (the bias corrections cancel in the ratio).
        """
        pairs = np.asarray(recent, dtype=np.float64)
        n = len(pairs)
        ema_w = self.ema_decay ** np.arange(n - 1, -1, -1, dtype=np.float64) if weighted else np.ones(n)
        rng = np.random.default_rng(self.seed + self.n_updates)
        w = rng.dirichlet(np.ones(n), size=self.bootstrap_samples) * ema_w
        g = w @ pairs[:, 0]
        s = w @ pairs[:, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.where(g > 0, s / np.where(g > 0, g, 1.0), np.inf)
        ratios.sort()  # order statistics, not interpolation: the ratios may hold inf
        tail = (1 - self.confidence) / 2
        last = len(ratios) - 1
        return float(ratios[int(math.floor(tail * last))]), float(ratios[int(math.ceil((1 - tail) * last))])


def _ratio(trace_sigma: float, g_sq: float) -> float:
    if math.isnan(trace_sigma) or math.isnan(g_sq):
        return float("nan")
    return trace_sigma / g_sq if g_sq > 0 else float("inf")
