"""The package reads as the pipeline and has no import circle (module or stage level)."""

import ast
from pathlib import Path

import batchpilot

ROOT = Path(batchpilot.__file__).resolve().parent
STAGES = ["workloads", "memory", "throughput", "noise", "scaling", "plan", "train", "sweep", "report", "doctor",
          "integrations", "optim", "cli"]


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = ROOT.parent / name.replace(".", "/")
    return rel.with_suffix(".py").exists() or rel.is_dir()


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):  # lazy (in-function) imports count too
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("batchpilot"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if _is_module(sub) else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("batchpilot"))
        edges[_module_of(path)] = deps
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_import_cycle():
    graph = _graph()
    modules = set(graph)
    assert _cycles({m: {d for d in ds if d in modules and d != m} for m, ds in graph.items()}) == []


def test_no_stage_import_cycle():
    def stage(m: str) -> str:
        return ".".join(m.split(".")[:2])

    stages: dict[str, set[str]] = {}
    for m, ds in _graph().items():
        stages.setdefault(stage(m), set()).update(stage(d) for d in ds if stage(d) != stage(m))
    assert _cycles(stages) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_root_holds_stage_packages_not_loose_modules():
    loose = sorted(p.stem for p in ROOT.glob("*.py") if p.stem not in {"__init__", "__main__", "errors", "files", "norm"})
    assert loose == []
    for name in STAGES:
        assert (ROOT / name / "__init__.py").is_file(), name
