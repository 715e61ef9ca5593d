"""docs/doctor.md: every code and field is documented, and its commands and example run as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from batchpilot.cli import main
from batchpilot.doctor import FIELDS, RULES

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "doctor.md").read_text()


def test_every_code_has_exactly_one_row_in_the_codes_table():
    rows = re.findall(r"^\| (BP\d{3}) \|", DOC, flags=re.M)
    assert sorted(rows) == sorted(RULES)


def test_every_schema_field_is_documented_with_its_aliases():
    for name, (_, aliases, _) in FIELDS.items():
        row = next((line for line in DOC.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, name
        for alias in aliases:
            assert f"`{alias}`" in row, (name, alias)


COMMANDS = re.findall(r"^\$ (batchpilot doctor .+?)\s+# exit (\d)$", DOC, flags=re.M)


def test_docs_have_commands():
    assert len(COMMANDS) >= 3


@pytest.mark.parametrize("command, expected", COMMANDS)
def test_documented_command_runs_with_documented_exit_code(command, expected, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    argv = shlex.split(command)
    assert argv[0] == "batchpilot"
    assert main(argv[1:]) == int(expected)
    assert capsys.readouterr().out


def test_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/doctor.md", "exec"), {})
    assert "BP201" in capsys.readouterr().out


def test_catalog_does_not_repeat_the_seed_errors():
    """seeds/README.md: accumulation is not stale; momentum claim; unproven regularization rules."""
    for rule in RULES.values():
        text = f"{rule.reason} {rule.title}".lower()
        if "stale" in text:
            assert "nothing is stale" in text, rule.code
        assert "momentum" not in text, rule.code
        assert "weight decay" not in text and "dropout" not in text, rule.code
