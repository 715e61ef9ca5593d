"""Look up a workload: a built-in by name, or a user's ``path/to/file.py:fn`` / ``package.module:fn``.

The function named by a path takes no arguments (or the options given) and returns a
:class:`~batchpilot.workloads.spec.Workload`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from batchpilot.errors import BatchpilotError
from batchpilot.workloads.spec import REGISTRY, Factory, Workload


def _ensure_builtins() -> None:
    from batchpilot.workloads import charlm, digits, hf, mnist1d  # noqa: F401  (registers the built-ins)


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
            raise BatchpilotError(f"workload file {str(path)!r} failed to import: {_one_line(exc)}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise BatchpilotError(f"workload module {target!r} failed to import: {_one_line(exc)}") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise BatchpilotError(f"workload {spec!r}: {target!r} has no callable {fn_name!r}")
    return fn


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, at most ~300 characters (user code may raise anything)."""
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_options(spec: str, factory: Factory, options: dict) -> None:
    """Name the options the factory's signature cannot take, before it runs."""
    if not options:
        return
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read: the call itself will tell
        return
    try:
        signature.bind(**options)
    except TypeError as exc:
        takes = [p.name for p in signature.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise BatchpilotError(f"workload {spec!r} does not accept options {sorted(options)} ({exc}); "
                              f"it takes: {', '.join(takes) or 'no options'}") from None


def get_workload(spec: str, **options: object) -> Workload:
    """Build a workload from a registered name or a ``file.py:fn`` / ``pkg.module:fn`` path.

    Args:
        spec: built-in name (see :func:`list_workloads`) or loader path.
        **options: passed to the factory (e.g. ``num_train=2000`` for MNIST-1D).

    Raises:
        BatchpilotError: unknown name (the known ones are listed), a path that does not import,
            options the factory does not take, a factory that raises (anything: one line naming the
            workload), or one that does not return a :class:`Workload`.
    """
    _ensure_builtins()
    if spec in REGISTRY:
        factory = REGISTRY[spec][0]
    elif spec.startswith("hf:"):  # a transformers config file: hf:path/config.json
        from batchpilot.workloads.hf import hf_factory

        factory = hf_factory(spec)
    elif ":" in spec:
        factory = _load_path(spec)
    else:
        known = ", ".join(sorted(REGISTRY))
        raise BatchpilotError(f"unknown workload {spec!r}; known: {known} (or 'file.py:fn', 'pkg.module:fn', "
                              "'hf:config.json')")
    _check_options(spec, factory, options)
    try:
        workload = factory(**options)
    except BatchpilotError:
        raise
    except Exception as exc:  # user code: whatever it raises becomes one line naming the workload
        raise BatchpilotError(f"workload {spec!r} failed to build: {_one_line(exc)}") from exc
    if not isinstance(workload, Workload):
        raise BatchpilotError(f"workload {spec!r} returned {type(workload).__name__}, expected batchpilot.Workload")
    return workload
