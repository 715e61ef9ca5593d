"""Read a training config or plan file (YAML, JSON or TOML) into a :class:`DoctorConfig`.

Every way a file can be unreadable (missing, bad syntax, not a mapping, a bad value)
becomes a one-line :class:`BatchpilotError`, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batchpilot.doctor.schema import DoctorConfig, parse_config
from batchpilot.errors import BatchpilotError, short_repr

FORMATS = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".toml": "toml"}

MAX_CONFIG_BYTES = 2 * 2**20
"""Largest config file read (training configs are a few KiB; a plan.json is well under 1 MiB)."""
MAX_NODES = 200_000
"""Largest parsed document, counting every value as often as YAML aliases repeat it (alias bombs stop here)."""
MAX_ALIASES = 1_000
"""Most YAML aliases (``*name``) in one file."""


def _yaml_loader():
    """A ``SafeLoader`` that refuses more than :data:`MAX_ALIASES` aliases."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent, index):  # type: ignore[override]
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_ALIASES:
                    raise BatchpilotError(f"more than {MAX_ALIASES} YAML aliases; expected a plain training config")
            return super().compose_node(parent, index)

    return BoundedLoader


def check_size(data: Any, name: str, limit: int = MAX_NODES) -> None:
    """Refuse a document whose values, expanded, exceed ``limit`` (alias bombs) or that contains itself."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise BatchpilotError(f"{name}: a value contains itself (recursive YAML alias); expected plain data")
        busy.add(key)
        total = 1
        for child in (node.values() if isinstance(node, dict) else node):
            total += size(child)
            if total > limit:
                raise BatchpilotError(f"{name}: more than {limit:,} values once aliases are expanded; expected a "
                                      f"plain training config")
        busy.discard(key)
        sizes[key] = total
        return total

    try:
        size(data)
    except RecursionError:
        raise BatchpilotError(f"{name}: nested too deeply; expected a plain training config") from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parse_toml(text: str, name: str) -> Any:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise BatchpilotError("reading TOML needs Python >= 3.11 or the tomli package") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BatchpilotError(f"{name}: invalid TOML: {_one_line(exc)}") from None


def parse_text(text: str, fmt: str, name: str = "config") -> Any:
    """Parse ``text`` as ``yaml``, ``json`` or ``toml``; syntax errors become one-line errors."""
    if fmt == "toml":
        return _parse_toml(text, name)
    try:
        if fmt == "json":
            return json.loads(text)
        if fmt == "yaml":
            import yaml

            return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
    except BatchpilotError:
        raise
    except json.JSONDecodeError as exc:
        raise BatchpilotError(f"{name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except Exception as exc:  # yaml.YAMLError and its subclasses, RecursionError on absurd nesting
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise BatchpilotError(f"{name}: invalid {fmt.upper()}{where}: {_one_line(problem)[:200]}") from None
    raise BatchpilotError(f"unknown config format {fmt!r}; expected yaml, json or toml")


def select_section(data: Any, section: str | None, name: str = "config") -> Any:
    """The mapping at dotted path ``section`` (e.g. ``training`` or ``trainer.batch``)."""
    if not section:
        return data
    node = data
    for part in section.split("."):
        if not isinstance(node, dict) or part not in node:
            raise BatchpilotError(f"{name}: section {short_repr(section)} not found (missing {short_repr(part)})")
        node = node[part]
    return node


def load_config(path: str | Path, section: str | None = None) -> DoctorConfig:
    """Read and validate a config or plan file.

    Args:
        path: a ``.yaml``/``.yml``, ``.json`` or ``.toml`` file. A JSON file with the keys
            of a ``batchpilot plan`` output is read as a plan.
        section: optional dotted path of the mapping that holds the fields.

    Raises:
        BatchpilotError: unreadable file, unknown extension, bad syntax or bad values.
    """
    if not str(path).strip():  # Path("") is the current directory: say what was given
        raise BatchpilotError(f"config must name a .yaml, .yml, .json or .toml file, got {str(path)!r}")
    p = Path(path)
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise BatchpilotError(f"config {str(p)!r} must end in .yaml, .yml, .json or .toml")
    try:
        if p.is_dir():
            raise BatchpilotError(f"config {str(p)!r} is a directory; expected a file")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise BatchpilotError(f"config {str(p)!r} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; expected a "
                                  f"training config or plan.json")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BatchpilotError(f"config file not found: {str(p)!r}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BatchpilotError(f"cannot read config {str(p)!r}: {_one_line(exc)}") from None
    data = parse_text(text, fmt, p.name)
    check_size(data, p.name)
    data = select_section(data, section, p.name)
    from batchpilot.doctor.schema import is_plan

    if isinstance(data, dict) and is_plan(data):  # a plan.json: the plan schema every consumer checks
        from batchpilot.plan.schema import validate_plan

        validate_plan(data, f"plan {p.name}")
    try:
        return parse_config(data)
    except BatchpilotError as exc:
        raise BatchpilotError(f"{p.name}: {exc}") from None
