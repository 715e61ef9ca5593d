"""The ``plan.json`` schema: what every consumer of a plan may rely on.

:func:`validate_plan` checks the core fields a plan is run by (``train --plan``, ``sweep
--plan``, ``doctor``, the Lightning and Hugging Face integrations all read plans through
:func:`batchpilot.plan.result.read_plan` or call it): their types, their ranges and the batch
arithmetic ``global_batch == micro_batch_per_rank x accumulation_steps x world_size``. Every
problem is a one-line :class:`BatchpilotError` naming the field, the value and what was expected.

Fields it does not know are tolerated (newer planners add evidence fields); optional fields may be
absent or ``null``. ``schema_version`` says which layout a file follows: absent means a plan
written before the field existed (layout 1); a version newer than :data:`SCHEMA_VERSION` is refused.

``workload_spec`` records how to rebuild the workload: ``{"name": <built-in name, hf:..., file.py:fn
or pkg.module:fn>, "options": {...}, "kind": "builtin"|"path"|"module"|"hf", "file": <resolved path
of a file.py, or null>}`` (see :mod:`batchpilot.plan.workload_spec`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from batchpilot.errors import BatchpilotError, short_repr

SCHEMA_VERSION = 1
"""The plan.json layout this batchpilot writes and reads."""

MAX_COUNT = 10**15
"""Upper bound for counts (batches, steps, ranks): keeps every product and ratio a finite float."""

REQUIRED = ("micro_batch_per_rank", "accumulation_steps", "world_size", "global_batch", "lr", "lr_rule",
            "warmup_steps")
"""What ``train --plan`` needs; the rest is optional."""

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def count(minimum: int) -> Callable[[Any], str | None]:
    """An integer in ``[minimum, 1e15]``."""

    def check(value: Any) -> str | None:
        if not _is_int(value) or not minimum <= value <= MAX_COUNT:
            return f"an integer from {minimum} to 1e15"
        return None

    return check


def number(low: float, *, closed: bool = False, high: float = math.inf) -> Callable[[Any], str | None]:
    """A finite number ``> low`` (``>= low`` when closed) and ``< high``."""

    def check(value: Any) -> str | None:
        ok = _is_number(value) and math.isfinite(value) and (value >= low if closed else value > low) and value < high
        if not ok:
            return f"a finite number {'>=' if closed else '>'} {low:g}" + (f" and < {high:g}" if high < math.inf else "")
        return None

    return check


def text(value: Any) -> str | None:
    """A non-empty string."""
    if not isinstance(value, str) or not value.strip():
        return "a non-empty string"
    return None


def choice(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    """One of ``options``."""

    def check(value: Any) -> str | None:
        if not isinstance(value, str) or value not in options:
            return f"one of {', '.join(options)}"
        return None

    return check


def texts(value: Any) -> str | None:
    """A list of strings."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return "a list of strings"
    return None


def flag(value: Any) -> str | None:
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        return "true or false"
    return None


def mapping(value: Any) -> str | None:
    """A JSON object."""
    if not isinstance(value, dict):
        return "a JSON object"
    return None


def _lr_rules() -> tuple[str, ...]:
    from batchpilot.scaling.lr_rules import LR_RULES

    return LR_RULES


def _schedules() -> tuple[str, ...]:
    from batchpilot.scaling.lr_schedules import SCHEDULES

    return SCHEDULES


def fields() -> dict[str, Callable[[Any], str | None]]:
    """The checked fields: name -> ``check(value)`` returning what was expected, or ``None`` when it is fine."""
    return {
        "schema_version": count(1),
        "workload": text,
        "micro_batch_per_rank": count(1),
        "accumulation_steps": count(1),
        "world_size": count(1),
        "global_batch": count(1),
        "lr": number(0.0),
        "lr_rule": choice(_lr_rules()),
        "warmup_steps": count(0),
        "schedule": choice(_schedules()),
        "threads": count(1),
        "base_batch": count(1),
        "base_lr": number(0.0),
        "max_micro_batch": count(1),
        "predicted_steps_to_target": count(1),
        "predicted_time_to_target_s": number(0.0, closed=True),
        "noise_scale": number(0.0, closed=True),
        "noise_scale_low": number(0.0, closed=True),
        "noise_scale_high": number(0.0, closed=True),
        "samples_per_s": number(0.0, closed=True),
        "efficiency": number(0.0, closed=True),
        "goodput": number(0.0, closed=True),
        "peak_bytes": number(0.0, closed=True),
        "usable_bytes": number(0.0, closed=True),
        "device": text,
        "target": text,
        "caveats": texts,
        "workload_spec": mapping,
        "worlds": mapping,
        "amp": choice(("bfloat16", "float16")),
        "tokens_per_sample": count(1),
        "memory_only": flag,
    }


def _fail(source: str, field: str, value: Any, expected: str) -> BatchpilotError:
    return BatchpilotError(f"{source}: {field} must be {expected}, got {short_repr(value)}")


def _check_spec(source: str, spec: Mapping[str, Any]) -> None:
    name = spec.get("name")
    if text(name):
        raise _fail(source, "workload_spec.name", name, "a workload name or a file.py:fn / pkg.module:fn path")
    options = spec.get("options", {})
    if options is None:
        options = {}
    if not isinstance(options, dict) or not all(isinstance(k, str) and k for k in options):
        raise _fail(source, "workload_spec.options", options, "a JSON object of option names to values")
    kind = spec.get("kind")
    if kind is not None and kind not in ("builtin", "path", "module", "hf"):
        raise _fail(source, "workload_spec.kind", kind, "one of builtin, path, module, hf")
    file = spec.get("file")
    if file is not None and text(file):
        raise _fail(source, "workload_spec.file", file, "a file path or null")


def _check_worlds(source: str, worlds: Mapping[str, Any]) -> None:
    elastic = worlds.get("elastic")
    if elastic is None:
        return
    if not isinstance(elastic, list):
        raise _fail(source, "worlds.elastic", elastic, "a list of splits")
    for i, e in enumerate(elastic):
        where = f"worlds.elastic[{i}]"
        if not isinstance(e, dict):
            raise _fail(source, where, e, "a JSON object")
        if count(1)(e.get("world_size")):
            raise _fail(source, f"{where}.world_size", e.get("world_size"), "an integer from 1 to 1e15")
        if not isinstance(e.get("compatible"), bool):
            raise _fail(source, f"{where}.compatible", e.get("compatible"), "true or false")
        if e["compatible"]:
            for k in ("micro_batch_per_rank", "accumulation_steps"):
                if count(1)(e.get(k)):
                    raise _fail(source, f"{where}.{k}", e.get(k), "an integer from 1 to 1e15")


def validate_plan(data: Any, source: str = "plan") -> dict[str, Any]:
    """Check a parsed ``plan.json``; return it unchanged.

    Args:
        data: the parsed JSON.
        source: how to name the plan in messages (e.g. ``plan file 'runs/plan.json'``).

    Raises:
        BatchpilotError: not an object, a missing required field, a field of the wrong type or out of
            range, a schema version newer than this batchpilot reads, or a batch split that does not multiply out.
    """
    if not isinstance(data, dict):
        raise BatchpilotError(f"{source} must hold a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED if data.get(k) is None]
    if missing:
        raise BatchpilotError(f"{source} lacks {', '.join(missing)}; expected a plan.json written by batchpilot plan")
    for name, check in fields().items():
        value = data.get(name)
        if value is None:
            continue
        expected = check(value)
        if expected:
            raise _fail(source, name, value, expected)
    version = data.get("schema_version")
    if version is not None and version > SCHEMA_VERSION:
        raise BatchpilotError(f"{source}: schema_version {version} is newer than this batchpilot reads "
                              f"({SCHEMA_VERSION}); upgrade batchpilot or plan again")
    if data.get("workload_spec"):  # {} = not recorded (a plan made through the Python API)
        _check_spec(source, data["workload_spec"])
    if data.get("worlds") is not None:
        _check_worlds(source, data["worlds"])
    m, k, w, g = (data[f] for f in ("micro_batch_per_rank", "accumulation_steps", "world_size", "global_batch"))
    if g != m * k * w:
        raise BatchpilotError(f"{source}: global_batch {g} != micro_batch_per_rank {m} x accumulation_steps {k} x "
                              f"world_size {w} = {m * k * w}; expected the product")
    return data
