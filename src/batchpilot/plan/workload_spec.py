"""How a plan records its workload, and which workload a plan may run.

A plan stores ``workload_spec = {"name", "options", "kind", "file"}``: the name as given to
``batchpilot plan`` (a built-in, ``hf:...``, ``file.py:fn`` or ``pkg.module:fn``), the factory's
options, its kind, and for a file the resolved path. ``train --plan`` and ``sweep --plan``
rebuild the workload from it.

**Only code named on the command line runs.** A plan file is data; it may have come from anywhere.
A plan whose workload is a built-in runs it. A plan whose workload is the user's own code (a file or
module) runs it only when the same ``--workload`` is given on the command line, or with the explicit
opt-in ``--trust-plan-workload``; otherwise :func:`workload_for_run` refuses with a one-line error.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Mapping

from batchpilot.errors import BatchpilotError

TRUST_FLAG = "--trust-plan-workload"


def builtin_names() -> set[str]:
    """The registered built-in workload names (hf:* included when registered)."""
    from batchpilot.workloads import list_workloads

    return set(list_workloads())


def is_builtin(name: str) -> bool:
    """Whether ``name`` is a registered built-in workload (no user code; ``hf:`` models excluded)."""
    return not name.startswith("hf:") and name in builtin_names()


def kind_of(name: str) -> str:
    """``builtin``, ``hf``, ``path`` (a ``file.py:fn``), ``module`` (``pkg.module:fn``) or ``unknown``."""
    if name.startswith("hf:"):
        return "hf"
    if name in builtin_names():
        return "builtin"
    target, sep, fn = name.rpartition(":")
    if not sep or not target or not fn:
        return "unknown"
    if target.endswith(".py") or "/" in target or "\\" in target:
        return "path"
    return "module"


def describe(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``workload_spec`` a plan records for ``--workload name`` with ``--workload-opt`` options."""
    kind = kind_of(name)
    file = None
    if kind == "path":
        target = name.rpartition(":")[0]
        file = str(Path(target).expanduser().resolve())
    return {"name": name, "options": dict(options or {}), "kind": kind, "file": file}


def _same(spec: Mapping[str, Any], given: str) -> bool:
    """Whether ``--workload given`` names the workload ``spec`` records."""
    name = spec["name"]
    if given == name:
        return True
    if spec.get("kind") == "path" and kind_of(given) == "path":
        g_target, _, g_fn = given.rpartition(":")
        fn = name.rpartition(":")[2]
        return g_fn == fn and spec.get("file") is not None and str(Path(g_target).expanduser().resolve()) == spec["file"]
    return False


def spec_of(plan: Mapping[str, Any]) -> dict[str, Any] | None:
    """The plan's workload spec; for a plan written before specs, one made from its ``workload`` name."""
    spec = plan.get("workload_spec")
    if spec:
        return {"name": spec["name"], "options": dict(spec.get("options") or {}),
                "kind": spec.get("kind") or kind_of(spec["name"]), "file": spec.get("file")}
    name = plan.get("workload")
    if not name:
        return None
    kind = kind_of(name)
    # an old plan's name is the workload's own name: a built-in's, or a user workload's (not a loader path)
    return {"name": name, "options": {}, "kind": kind if kind in ("builtin", "hf") else "unknown", "file": None}


def workload_for_run(plan: Mapping[str, Any], plan_path: str, given: str | None, given_options: Mapping[str, Any],
                     *, trust: bool = False, default: str) -> tuple[str, dict[str, Any]]:
    """The workload name and options a ``--plan`` run uses.

    Args:
        plan: the validated plan.
        plan_path: the plan's path, for messages.
        given: ``--workload`` from the command line, or ``None`` when not given.
        given_options: ``--workload-opt`` options (they win over the plan's).
        trust: ``--trust-plan-workload``: run the user code a plan names without naming it again.
        default: the workload when neither the plan nor the command line names one.

    Raises:
        BatchpilotError: ``given`` differs from the plan's workload; the plan names user code that was not
            named on the command line; or an old plan names a workload that is not built in.
    """
    spec = spec_of(plan)
    if spec is None:
        return given or default, dict(given_options)
    if given is not None:
        if spec["kind"] != "unknown" and not _same(spec, given):
            raise BatchpilotError(f"plan {plan_path!r} is for workload {spec['name']!r}, not {given!r}; give "
                                  f"--workload {shlex.quote(spec['name'])} or plan {given!r} again")
        return given, {**spec["options"], **given_options}
    if spec["kind"] in ("builtin", "hf"):
        return spec["name"], {**spec["options"], **given_options}
    if spec["kind"] == "unknown":
        raise BatchpilotError(f"plan {plan_path!r} names workload {spec['name']!r}, which is not built in and the "
                              f"plan does not record how to load it; give the --workload file.py:fn it was planned with")
    if not trust:
        raise BatchpilotError(f"plan {plan_path!r} runs your code {spec['name']!r}; batchpilot runs only code named on "
                              f"the command line: add --workload {shlex.quote(spec['name'])} (or {TRUST_FLAG})")
    name = spec["name"]
    if spec["kind"] == "path" and spec.get("file"):
        target, _, fn = name.rpartition(":")
        if not Path(target).expanduser().is_file() and Path(spec["file"]).is_file():
            name = f"{spec['file']}:{fn}"  # planned from another directory
    return name, {**spec["options"], **given_options}


def run_command(plan_json: str | Path, spec: Mapping[str, Any]) -> str:
    """The exact ``batchpilot train`` command that runs a plan written to ``plan_json``."""
    parts = ["batchpilot", "train", "--plan", str(plan_json)]
    if spec.get("kind") in ("path", "module"):
        parts += ["--workload", spec["name"]]
    return " ".join(shlex.quote(p) for p in parts)
