"""The examples of README.md and docs/**/*.md run as written.

Every ```bash / ```sh / ```console block is split into commands (``\\`` continuations joined; in
```console blocks only ``$ `` lines) and each command is a test; every ```python block is a test too.

- ``batchpilot ...`` runs in this process (``batchpilot.cli.main``); ``torchrun ...`` and other
  programs run as subprocesses. Each document gets its own working directory (with ``docs/`` linked in,
  so ``docs/examples/...`` resolves, and ``bench/`` linked in, so ``python bench/claims/x.py`` runs
  as from the repository root while its outputs land in the working directory), and its commands run in document order there: a command that
  reads an earlier command's ``--out`` directory runs that command first.
- A python block whose first line is ``# name.py`` is a file the doc asks you to create: it is written
  into the working directory (and compiled as its own test); other python blocks are executed.
- The expected exit code is 0 unless the line's comment says ``# exit N`` / ``# exit code N``.
- Long examples (a full plan or sweep, several processes, transformer traces, Lightning and HF
  training runs) are marked ``slow`` (``pytest -m slow``); so is a command that needs a slow one's
  output. Installation lines (venv, ``pip install``) are not run here: that is ``.ci/run``'s job.
  ``--probe`` needs a CUDA GPU and skips without one.
"""

from __future__ import annotations

import contextlib
import os
import py_compile
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL = ("bash", "sh", "shell", "console")

SLOW_RULES = (  # (regex on the command or the python source, why it is slow)
    (r"^torchrun\b|--nproc\b", "launches several processes"),
    (r"^batchpilot (plan|sweep)\b", "a full plan or sweep"),
    (r"--adaptive\b", "measures the noise scale while it trains"),
    (r"--workload hf:", "traces a transformer (tens of seconds to minutes)"),
    (r"^batchpilot memory\b(?!.*--no-what-if).*--workload charlm\b", "charlm with its what-if traces (about 25 s)"),
    (r"^\s*(import|from) (lightning|transformers)\b", "trains with Lightning / the Hugging Face Trainer"),
)
SETUP = re.compile(r"^(python3? -m venv|pip install)\b|&& pytest\b")
EXIT = re.compile(r"#.*\bexit(?: code)? (\d+)\b")
FILE_BLOCK = re.compile(r"^# ([\w./-]+\.py)\b")
SLOW_MARK = re.compile(r"#\s*slow:\s*(.+?)\s*$", re.M)  # "# slow: why" in a command's comment or a python block's first line


@dataclass
class Example:
    doc: Path
    line: int
    kind: str  # "command" | "python" | "file"
    text: str
    expect: int = 0
    slow: str = ""
    skip: str = ""
    deps: list[int] = field(default_factory=list)  # indexes of earlier examples of the same doc
    out: str | None = None

    @property
    def id(self) -> str:
        rel = self.doc.relative_to(ROOT)
        first = self.text.strip().splitlines()[0]
        short = (" ".join(shlex.split(first, comments=True)) if self.kind == "command" else first)[:70]
        return f"{rel}:{self.line}:{short}"


def _blocks(text: str):
    for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        yield m.group(1).lower(), m.group(2), text[: m.start()].count("\n") + 2


def _commands(lang: str, body: str, first: int):
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        start, line = i, lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i].strip()
        i += 1
        if lang == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if line.strip() and not line.lstrip().startswith("#"):
            yield first + start, line.strip()


def _option(argv: list[str], name: str) -> str | None:
    for i, tok in enumerate(argv):
        if tok == name and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
    return None


def _slow(text: str, raw: str = "") -> str:
    """Why the example is slow ("" if it is not): the SLOW_RULES on ``text``, then a ``# slow: why`` mark in ``raw``
    (a command's comment, or a python block's first line)."""
    why = next((why for pattern, why in SLOW_RULES if re.search(pattern, text, flags=re.M)), "")
    mark = SLOW_MARK.search(raw.split("\n", 1)[0] if "\n" in raw else raw)
    return why or (mark.group(1) if mark else "")


def collect(doc: Path) -> list[Example]:
    out: list[Example] = []
    for lang, body, first in _blocks(doc.read_text(encoding="utf-8")):
        if lang in SHELL:
            for line, cmd in _commands(lang, body, first):
                argv = shlex.split(cmd, comments=True)
                ex = Example(doc, line, "command", cmd, slow=_slow(" ".join(argv), cmd))
                found = EXIT.search(cmd)
                ex.expect = int(found.group(1)) if found else 0
                if SETUP.search(cmd):
                    ex.skip = "installs the package: .ci/run does that on a fresh machine"
                elif "--probe" in argv:
                    ex.skip = "cuda"
                ex.out = _option(argv, "--out")
                for j, prev in enumerate(out):  # reads an earlier command's --out directory
                    if prev.kind == "command" and prev.out and any(
                            tok == prev.out or tok.startswith(prev.out.rstrip("/") + "/") for tok in argv[1:]):
                        ex.deps.append(j)
                out.append(ex)
        elif lang == "python":
            name = FILE_BLOCK.match(body)
            if name:
                out.append(Example(doc, first, "file", name.group(1), slow="", skip=""))
                out[-1].out = body  # the file's content
            else:
                out.append(Example(doc, first, "python", body, slow=_slow(body, body)))
    for ex in out:  # a command that needs a slow one's output is slow too
        for j in ex.deps:
            if out[j].slow and not ex.slow:
                ex.slow = f"needs the output of `{out[j].text[:50]}...` ({out[j].slow})"
    return out


EXAMPLES = {doc: collect(doc) for doc in DOCS}
PARAMS = [pytest.param(doc, i, id=ex.id, marks=[pytest.mark.slow] if ex.slow else [])
          for doc, exs in EXAMPLES.items() for i, ex in enumerate(exs)]


class Workdirs:
    """One working directory per document, with the doc's files written and the results of what ran."""

    def __init__(self, factory) -> None:
        self.factory, self.dirs, self.results = factory, {}, {}

    def dir(self, doc: Path) -> Path:
        if doc not in self.dirs:
            d = self.factory.mktemp(re.sub(r"\W", "_", doc.relative_to(ROOT).as_posix()))
            (d / "docs").symlink_to(ROOT / "docs", target_is_directory=True)
            (d / "bench").symlink_to(ROOT / "bench", target_is_directory=True)
            for ex in EXAMPLES[doc]:
                if ex.kind == "file":
                    (d / ex.text).write_text(ex.out, encoding="utf-8")
            self.dirs[doc] = d
        return self.dirs[doc]


@pytest.fixture(scope="session")
def workdirs(tmp_path_factory):
    return Workdirs(tmp_path_factory)


def _run_command(ex: Example, cwd: Path, capsys) -> tuple[int, str]:
    argv = shlex.split(ex.text, comments=True)
    if argv[0] == "batchpilot":
        from batchpilot.cli import main

        capsys.readouterr()
        with contextlib.chdir(cwd) if hasattr(contextlib, "chdir") else _chdir(cwd):
            try:
                code = main(argv[1:])
            except SystemExit as exc:  # argparse's own errors
                code = exc.code if isinstance(exc.code, int) else 1
        cap = capsys.readouterr()
        return code, cap.out + cap.err
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONDONTWRITEBYTECODE": "1"}  # bench/ is linked in: leave no __pycache__ in the repository
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    return done.returncode, done.stdout + done.stderr


@contextlib.contextmanager
def _chdir(path: Path):  # contextlib.chdir is Python >= 3.11
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _ensure(doc: Path, i: int, workdirs: Workdirs, capsys) -> None:
    key = (doc, i)
    if key in workdirs.results:
        code, output = workdirs.results[key]
        ex = EXAMPLES[doc][i]
        assert code == ex.expect, f"{ex.id} (run earlier) exited {code}, expected {ex.expect}:\n{output[-3000:]}"
        return
    ex = EXAMPLES[doc][i]
    for j in ex.deps:
        _ensure(doc, j, workdirs, capsys)
    code, output = _run_command(ex, workdirs.dir(doc), capsys)
    workdirs.results[key] = (code, output)
    assert code == ex.expect, f"`{ex.text}` ({ex.id}) exited {code}, expected {ex.expect}:\n{output[-3000:]}"


@pytest.mark.parametrize("doc, index", PARAMS)
def test_doc_example(doc, index, workdirs, capsys):
    ex = EXAMPLES[doc][index]
    if ex.skip == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("--probe runs real steps on a CUDA GPU; none here")
    elif ex.skip:
        pytest.skip(ex.skip)
    cwd = workdirs.dir(doc)
    if ex.kind == "file":
        py_compile.compile(str(cwd / ex.text), doraise=True)
    elif ex.kind == "python":
        with _chdir(cwd):
            exec(compile(ex.text, f"{doc.relative_to(ROOT)}:{ex.line}", "exec"), {"__name__": "__main__"})
    else:
        _ensure(doc, index, workdirs, capsys)


def test_the_docs_have_examples_and_sort_them():
    kinds = [ex for exs in EXAMPLES.values() for ex in exs]
    assert sum(ex.kind == "command" for ex in kinds) >= 20 and any(ex.kind == "python" for ex in kinds)
    readme = EXAMPLES[ROOT / "README.md"]
    by_text = {ex.text.split("#")[0].strip(): ex for ex in readme if ex.kind == "command"}
    plan = next(ex for t, ex in by_text.items() if t.startswith("batchpilot plan --workload mnist1d-cnn"))
    run_it = next(ex for t, ex in by_text.items() if t.startswith("batchpilot train --plan runs/plan/plan.json"))
    assert plan.slow and run_it.slow and readme.index(plan) in run_it.deps
    doctor = next(ex for t, ex in by_text.items() if t.startswith("batchpilot doctor docs/examples/doctor-bad.yaml"))
    assert doctor.expect == 1 and not doctor.slow
    assert all(ex.skip for ex in readme[:2])  # the two set-up lines


def test_doctor_md_names_every_code_the_bad_example_reports(capsys):
    """docs/doctor.md lists the codes doctor-bad.yaml produces (BP403 was left out once)."""
    import json

    from batchpilot.cli import main

    capsys.readouterr()
    assert main(["doctor", str(ROOT / "docs/examples/doctor-bad.yaml"), "--json"]) == 1
    codes = {f["code"] for f in json.loads(capsys.readouterr().out)["findings"]}
    text = (ROOT / "docs/doctor.md").read_text(encoding="utf-8")
    described = re.search(r"`doctor-bad\.yaml`:(.*?)\n- ", text, flags=re.S).group(1)
    assert codes == set(re.findall(r"BP\d{3}", described))


def test_claims_md_runs_its_commands_and_marks_the_long_ones_slow():
    """docs/claims.md's commands are collected (tagged blocks); every experiment script is marked slow."""
    exs = EXAMPLES[ROOT / "docs/claims.md"]
    commands = [ex for ex in exs if ex.kind == "command"]
    assert len(commands) >= 25
    quick = {"python bench/claims/decision_tree.py"}  # prints the guide's tree, trains nothing
    scripts = [ex for ex in commands if ex.text.startswith("python bench/") and ex.text not in quick]
    assert scripts and all(ex.slow for ex in scripts)
    assert _slow("python x.py", "python x.py  # slow: minutes") == "minutes"
    assert _slow("python x.py", "python x.py  # slowly") == ""
