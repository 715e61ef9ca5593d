"""A minimal training loop for the claim checks: loss against samples seen, with the batch and the LR
as functions of the samples seen (so warmup, a shrinking batch and a constant batch are all one loop).

``batchpilot.train`` grows batches only (its schedules ramp up); the warmup-as-a-shrinking-batch check
needs a batch that *falls*, so the claim scripts use this loop. It is the trainer's step, not a new one:
the same seeding (``torch.manual_seed(seed)`` before ``make_model``), the same data order
(:class:`~batchpilot.workloads.data.EpochBatchSampler` with ``seed``), the same exact accumulation
(:func:`~batchpilot.train.accumulate_gradients`) and the same evaluation
(:func:`~batchpilot.train.evaluate`). With a constant batch and LR it gives ``batchpilot.train``'s
losses bit for bit (``tests/bench/test_claims_curves.py``).

The scripts run as ``python bench/claims/<name>.py``, so ``bench/claims/`` is on ``sys.path`` and they
import this module as ``_curves``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from batchpilot.train import accumulate_gradients, evaluate
from batchpilot.workloads.data import EpochBatchSampler, fetch, split_micro

Schedule = Callable[[int], float]
"""A function of the samples seen before the step (0 at the first step)."""


@dataclass
class Curve:
    """One run: ``points`` are ``(samples, mean train loss since the last point, val loss, val metric, steps)``."""

    points: list[tuple[int, float, float, float, int]] = field(default_factory=list)
    steps: int = 0
    samples: int = 0
    diverged: bool = False
    wall_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    """The mean loss of every optimizer step."""
    model: torch.nn.Module | None = field(default=None, repr=False)
    """The trained model, for checks of its own."""

    def val_loss_at(self, samples: int) -> float:
        """The validation loss at the first evaluation at or after ``samples`` (``inf`` if none or diverged)."""
        return next((v for s, _, v, _ in self.points if s >= samples), math.inf)

    def samples_to(self, metric: str, op: str, value: float) -> int | None:
        """Samples at the first evaluation whose ``metric`` (``val_loss``, ``val_metric`` or ``train_loss``)
        meets ``op value`` (``>=`` or ``<=``); ``None`` if never."""
        p = self._first(metric, op, value)
        return None if p is None else p[0]

    def steps_to(self, metric: str, op: str, value: float) -> int | None:
        """Like :meth:`samples_to`, in optimizer steps."""
        p = self._first(metric, op, value)
        return None if p is None else p[4]

    def _first(self, metric: str, op: str, value: float):
        col = {"train_loss": 1, "val_loss": 2, "val_metric": 3}[metric]
        return next((p for p in self.points if (op == ">=" and p[col] >= value) or (op == "<=" and p[col] <= value)),
                    None)


def constant(x: float) -> Schedule:
    return lambda samples: x


def run_curve(workload, *, batch: Schedule | int, lr: Schedule | float, samples: int, eval_at: Sequence[int],
              seed: int = 0, micro_batch: int | None = None, make_optimizer=None,
              diverge_factor: float = 10.0, max_steps: int | None = None,
              stop_at: tuple[str, str, float] | None = None,
              controller: Callable[[torch.nn.Module, int, int], tuple[float, float]] | None = None) -> Curve:
    """Train ``workload`` for ``samples`` samples; evaluate on the validation set after the first step
    that reaches each of ``eval_at`` (and at the end).

    Args:
        batch: the global batch of the next step (an int or a function of the samples seen).
        lr: the LR of the next step (a float or a function of the samples seen).
        micro_batch: split every batch into micro-batches of this size (exact accumulation).
        make_optimizer: ``(params, lr) -> optimizer``; defaults to the workload's.
        diverge_factor: stop, ``diverged``, when a step's loss is non-finite or above this multiple of the first.
        stop_at: ``(metric, op, value)`` as in :meth:`Curve.samples_to`: stop at the first evaluation that meets it.
        controller: ``(model, samples seen, steps) -> (batch, lr)`` before every step, for schedules that read the
            model (it replaces ``batch`` and ``lr``; it must leave the model's ``.grad`` as it found it: ``None``).
    The caller's global RNG is restored after the run.
    """
    batch_fn = batch if callable(batch) else constant(batch)
    lr_fn = lr if callable(lr) else constant(lr)
    w = workload
    pending = sorted(set(int(s) for s in eval_at if 0 < s <= samples)) + [samples]
    out = Curve()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = w.make_model()
        model.train()
        opt = (make_optimizer or w.make_optimizer)(model.parameters(), float(lr_fn(0)))
        sampler = EpochBatchSampler(w.num_train, seed=seed)
        seen, since, first = 0, [], None
        t0 = time.perf_counter()
        while seen < samples and (max_steps is None or out.steps < max_steps):
            want_b, want_lr = controller(model, seen, out.steps) if controller else (batch_fn(seen), lr_fn(seen))
            b = max(1, min(int(round(want_b)), w.num_train))
            for g in opt.param_groups:
                g["lr"] = float(want_lr)
            idx = sampler.next_batch(b)
            parts = split_micro(idx, micro_batch or len(idx))
            loss = accumulate_gradients(model, [fetch(w.train_data, p) for p in parts], w.loss_sum, w.count_units)
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen += len(idx)
            out.steps += 1
            out.losses.append(loss)
            first = loss if first is None else first
            if not math.isfinite(loss) or (out.steps > 1 and loss > diverge_factor * max(first, 1e-8)):
                out.diverged = True
                break
            since.append(loss)
            if pending and seen >= pending[0]:  # one evaluation for every point this step passed
                while pending and seen >= pending[0]:
                    pending.pop(0)
                out.wall_s += time.perf_counter() - t0
                ev = evaluate(model, w)
                out.points.append((seen, sum(since) / len(since), ev["val_loss"], ev["val_metric"], out.steps))
                since = []
                t0 = time.perf_counter()
                if stop_at is not None and out._first(*stop_at) is not None:
                    break
        out.samples, out.model = seen, model
    return out


def geometric(lo: int, hi: int, per_octave: int = 2) -> list[int]:
    """Sample counts from ``lo`` to ``hi``, ``per_octave`` per doubling."""
    n = int(round(math.log2(hi / lo) * per_octave))
    return sorted({int(round(lo * 2 ** (i / per_octave))) for i in range(n + 1)})
