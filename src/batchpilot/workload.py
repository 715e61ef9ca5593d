"""The Workload: what to train, and the point (base batch, base LR) the user tuned.

A workload is plain data plus factories. Every later stage (memory, throughput,
noise, plan, train, sweep) only reads it. Built-ins register themselves in
:data:`REGISTRY`; user workloads load from ``path/to/file.py:make_workload`` or
``package.module:fn`` (the function takes no arguments and returns a
:class:`Workload`).
"""

from __future__ import annotations

import importlib
import importlib.util
import operator
import re
import sys
from dataclasses import dataclass
from pathlib import Path
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


def _ensure_builtins() -> None:
    import batchpilot.workloads  # noqa: F401  (registers the built-ins)


def list_workloads() -> dict[str, str]:
    """Names and one-line descriptions of the built-in workloads."""
    _ensure_builtins()
    return {name: desc for name, (_, desc) in sorted(REGISTRY.items())}


def _load_path(spec: str) -> Factory:
    target, _, fn_name = spec.rpartition(":")
    if not target or not fn_name:
        raise BatchpilotError(f"workload path must be 'file.py:fn' or 'pkg.module:fn', got {spec!r}")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise BatchpilotError(f"workload file {str(path)!r} does not exist")
        mod_name = f"batchpilot_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise BatchpilotError(f"workload file {str(path)!r} cannot be imported as Python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # user code: report, do not crash with a traceback
            sys.modules.pop(mod_name, None)
            raise BatchpilotError(f"workload file {str(path)!r} failed to import: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise BatchpilotError(f"workload module {target!r} failed to import: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise BatchpilotError(f"workload {spec!r}: {target!r} has no callable {fn_name!r}")
    return fn


def get_workload(spec: str, **options: object) -> Workload:
    """Build a workload from a registered name or a ``file.py:fn`` / ``pkg.module:fn`` path.

    Args:
        spec: built-in name (see :func:`list_workloads`) or loader path.
        **options: passed to the factory (e.g. ``num_train=2000`` for MNIST-1D).

    Raises:
        BatchpilotError: unknown name (the known ones are listed), a path that does not import,
            or a factory that does not return a :class:`Workload`.
    """
    _ensure_builtins()
    if spec in REGISTRY:
        factory = REGISTRY[spec][0]
    elif ":" in spec:
        factory = _load_path(spec)
    else:
        known = ", ".join(sorted(REGISTRY))
        raise BatchpilotError(f"unknown workload {spec!r}; known: {known} (or 'file.py:fn', 'pkg.module:fn')")
    try:
        workload = factory(**options)
    except BatchpilotError:
        raise
    except TypeError as exc:
        raise BatchpilotError(f"workload {spec!r} does not accept options {sorted(options)}: {exc}") from exc
    if not isinstance(workload, Workload):
        raise BatchpilotError(f"workload {spec!r} returned {type(workload).__name__}, expected batchpilot.Workload")
    return workload
