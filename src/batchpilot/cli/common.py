"""Helpers shared by subcommands: workload options and JSON output."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.workloads import Workload, get_workload

DEFAULT_WORKLOAD = "mnist1d-cnn"


MEMORY_ONLY_VERBS = ("plan", "train", "sweep")

WORKLOAD_METAVAR = "NAME|FILE.py:FN"


def add_workload_args(p: argparse.ArgumentParser, *, plan_aware: bool = False) -> None:
    """``--workload NAME|file.py:fn`` and repeated ``--workload-opt key=value``.

    ``--workload`` defaults to ``None`` so that a command can tell whether it was given (see
    :func:`workload_name`); ``plan_aware`` commands take the workload of ``--plan`` when it is not.
    """
    default = f"{DEFAULT_WORKLOAD}, or the plan's with --plan" if plan_aware else DEFAULT_WORKLOAD
    p.add_argument("--workload", default=None, metavar=WORKLOAD_METAVAR,
                   help=f"built-in name (batchpilot workloads) or your own file.py:fn / pkg.module:fn (default: {default})")
    p.add_argument("--workload-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="option for the workload factory, e.g. num_train=2000 (repeatable; default: none)")


def workload_name(args: argparse.Namespace) -> str:
    """The workload ``--workload`` names, or the default one.

    Raises:
        BatchpilotError: ``--workload`` was given empty (not silently the default).
    """
    if args.workload is not None and not str(args.workload).strip():
        raise BatchpilotError(f"--workload must name a workload (batchpilot workloads lists them) or file.py:fn, "
                              f"got {args.workload!r}")
    return args.workload or DEFAULT_WORKLOAD


DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "f32": "float32", "float": "float32",
                 "bf16": "bfloat16", "bfloat16": "bfloat16",
                 "fp16": "float16", "float16": "float16", "f16": "float16", "half": "float16",
                 "fp64": "float64", "float64": "float64", "f64": "float64", "double": "float64"}
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
DTYPE_METAVAR = "DTYPE"

_REFUSED_DTYPES = {"float16": "float16 training needs loss scaling, which the trainer does not do; use bf16 (or "
                              "batchpilot memory --dtype fp16 to size it)"}


def add_dtype_arg(p: argparse.ArgumentParser, allowed: tuple[str, ...], what: str) -> None:
    """``--dtype``: accepts the short and long names (fp32/float32, bf16/bfloat16, fp16/float16, ...)."""
    names = ", ".join(f"{_SHORT.get(d, d)}/{d}" for d in allowed)

    def parse(text: str) -> str:
        name = DTYPE_ALIASES.get(text.strip().lower())
        if name is None:
            raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; expected one of {names}")
        if name not in allowed:
            raise argparse.ArgumentTypeError(_REFUSED_DTYPES.get(name, f"dtype {text!r} is not available here; "
                                                                        f"expected one of {names}"))
        return name

    parse.__name__ = "dtype"
    p.add_argument("--dtype", type=parse, default="float32", metavar=DTYPE_METAVAR,
                   help=f"{what}: {names} (default: fp32)")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError, RecursionError):
        return text


def workload_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--workload-opt KEY=VALUE`` options (values parsed as JSON where they are JSON)."""
    options: dict[str, Any] = {}
    for item in args.workload_opt:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BatchpilotError(f"--workload-opt must be KEY=VALUE, got {item!r}")
        options[key.strip()] = _parse_value(value)
    return options


def refuse_memory_only(name: str, verb: str) -> None:
    """Kept for callers: whether an ``hf:*`` workload is memory-only depends on its options (data, size), so
    :func:`load_workload` decides from the built workload's ``memory_only``; nothing is refused by name."""


def load_workload(args: argparse.Namespace, verb: str | None = None) -> Workload:
    """Build the workload named by ``--workload`` with its ``--workload-opt`` options."""
    name = workload_name(args)
    if verb is not None:
        refuse_memory_only(name, verb)
    workload = get_workload(name, **workload_options(args))
    if verb in MEMORY_ONLY_VERBS and workload.memory_only:
        why = f" ({workload.description})" if workload.description else ""
        also = (f"; or plan it for a GPU without training it: batchpilot plan --workload {name} --device H100"
                if verb == "plan" else "")
        raise BatchpilotError(f"workload {name!r} is memory-only{why}: {verb} cannot use it; predict its memory "
                              f"with: batchpilot memory --workload {name}{also}")
    return workload


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def print_json(data: Any) -> None:
    """Print strict JSON (NaN/inf become null) to stdout."""
    json.dump(_clean(data), sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")
