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


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """``--workload NAME|file.py:fn`` and repeated ``--workload-opt key=value``."""
    p.add_argument("--workload", default=DEFAULT_WORKLOAD, help=f"built-in name or file.py:fn / pkg.module:fn (default {DEFAULT_WORKLOAD})")
    p.add_argument("--workload-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="option for the workload factory, e.g. num_train=2000 (repeatable)")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_workload(args: argparse.Namespace) -> Workload:
    """Build the workload named by ``--workload`` with its ``--workload-opt`` options."""
    options: dict[str, Any] = {}
    for item in args.workload_opt:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BatchpilotError(f"--workload-opt must be KEY=VALUE, got {item!r}")
        options[key] = _parse_value(value)
    return get_workload(args.workload, **options)


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
