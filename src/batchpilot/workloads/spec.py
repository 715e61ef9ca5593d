"""The Workload: what to train, and the point (base batch, base LR) the user tuned.

A workload is plain data plus factories. Every later stage (memory, throughput,
noise, plan, train, sweep) only reads it. Built-ins register themselves in
:data:`REGISTRY` with :func:`register`; :mod:`batchpilot.workloads.registry` looks
them up and loads user workloads.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import Dataset

from batchpilot.errors import BatchpilotError

LossSum = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_sum(output, target)``: the loss *summed* over the units (samples or tokens) of a batch."""
MetricSum = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``metric_sum(output, target)``: the metric summed over the units of a batch."""
OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]


def count_samples(target: torch.Tensor) -> int:
    """Units of a classification batch: one per sample."""
    return int(target.shape[0])


def count_tokens(target: torch.Tensor) -> int:
    """Units of a language-model batch: one per target token (ignore index -100 excluded)."""
    return int((target != -100).sum())


_TARGET_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


@dataclass(frozen=True)
class Target:
    """A target such as ``val_acc>=0.85``: the metric name, comparison and threshold."""

    metric: str
    op: str
    value: float

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise BatchpilotError(f"target operator must be one of {sorted(_OPS)}, got {self.op!r}")

    @classmethod
    def parse(cls, text: str) -> "Target":
        """Parse ``'val_acc>=0.9'``; raise a clear error on anything else."""
        m = _TARGET_RE.match(text)
        if not m:
            raise BatchpilotError(f"target must look like 'val_acc>=0.9', got {text!r}")
        return cls(m.group(1), m.group(2), float(m.group(3)))

    def reached(self, value: float) -> bool:
        """Whether ``value`` meets the target."""
        return bool(_OPS[self.op](value, self.value))

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


@dataclass(frozen=True)
class Workload:
    """What to train.

    Attributes:
        name: registry name or loader path.
        make_model: builds a freshly initialised model (uses torch's global RNG; callers seed it).
        train_data: training dataset; items are ``(input, target)`` tuples.
        val_data: validation dataset, same item format.
        loss_sum: loss summed over the batch's units; the trainer divides by the true
            unit count of the *global* batch so accumulation and ragged batches are exact.
        make_optimizer: ``make_optimizer(params, lr)``; its class picks the LR-scaling rule.
        base_batch: the global batch the user tuned ``base_lr`` at (B0 in the plan).
        base_lr: the LR tuned at ``base_batch``.
        metric_name: validation metric name, e.g. ``"val_acc"``.
        metric_sum: the metric summed over a batch's units (mean = sum / units).
        higher_is_better: the metric's direction.
        count_units: units in a target batch (samples, or tokens for language models).
        target: optional target the metric should reach, e.g. ``val_acc>=0.85``.
        description: one line for ``batchpilot workloads``.
        seq_len: sequence length for sequence models, else ``None``.
        memory_only: random data for memory prediction only (``hf:*``); training it is refused.
        rebuild: ``rebuild(**changes)`` builds this workload again with some factory options changed
            (``seq_len=2048``), keeping the others; ``None``: rebuilt by name through ``get_workload``.
    """

    name: str
    make_model: Callable[[], nn.Module]
    train_data: Dataset
    val_data: Dataset
    loss_sum: LossSum
    make_optimizer: OptimizerFactory
    base_batch: int
    base_lr: float
    metric_name: str = "val_acc"
    metric_sum: MetricSum | None = None
    higher_is_better: bool = True
    count_units: Callable[[torch.Tensor], int] = count_samples
    target: Target | None = None
    description: str = ""
    seq_len: int | None = None
    memory_only: bool = False
    rebuild: Callable[..., "Workload"] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.base_batch, bool) or not isinstance(self.base_batch, int) or self.base_batch < 1:
            raise BatchpilotError(f"workload {self.name!r}: base_batch must be a positive integer, got {self.base_batch!r}")
        if not (self.base_lr > 0):
            raise BatchpilotError(f"workload {self.name!r}: base_lr must be > 0, got {self.base_lr!r}")
        n = len(self.train_data)  # type: ignore[arg-type]
        if n < 1:
            raise BatchpilotError(f"workload {self.name!r}: the training set is empty")

    @property
    def num_train(self) -> int:
        """Number of training samples."""
        return len(self.train_data)  # type: ignore[arg-type]

    def optimizer_family(self) -> str:
        """The optimizer's class name in lower case (``sgd``, ``adamw``, ``lamb`` ...), built on a dummy param."""
        opt = self.make_optimizer([nn.Parameter(torch.zeros(1))], self.base_lr)
        return type(opt).__name__.lower()


Factory = Callable[..., Workload]
REGISTRY: dict[str, tuple[Factory, str]] = {}


def register(name: str, description: str) -> Callable[[Factory], Factory]:
    """Decorator: register a built-in workload factory under ``name``."""

    def deco(fn: Factory) -> Factory:
        REGISTRY[name] = (fn, description)
        return fn

    return deco
