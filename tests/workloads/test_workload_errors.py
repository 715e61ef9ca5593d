"""A workload factory that fails, whatever it raises, is one line naming the workload, never a traceback."""

from __future__ import annotations

import textwrap

import pytest

from batchpilot.cli import main
from batchpilot.errors import EXIT_USAGE, BatchpilotError
from batchpilot.workloads import get_workload

FACTORIES = '''
def value_error():
    raise ValueError("dataset path\\n  /data/x is missing")

def key_error():
    return {}["num_train"]

def zero():
    return 1 / 0

def runtime_error():
    raise RuntimeError("CUDA error: out of memory\\nCUDA kernel errors might be asynchronously reported")

def inner_type_error(num_train=10):
    return len(num_train)

def interrupted():
    raise KeyboardInterrupt

def not_a_workload():
    return 42
'''


@pytest.fixture()
def wl_file(tmp_path):
    path = tmp_path / "factories.py"
    path.write_text(textwrap.dedent(FACTORIES))
    return path


@pytest.mark.parametrize("fn, expected", [
    ("value_error", "failed to build: ValueError: dataset path /data/x is missing"),
    ("key_error", "failed to build: KeyError: 'num_train'"),
    ("zero", "failed to build: ZeroDivisionError: division by zero"),
    ("runtime_error", "failed to build: RuntimeError: CUDA error: out of memory CUDA kernel errors"),
    ("inner_type_error", "failed to build: TypeError: object of type 'int' has no len()"),
    ("not_a_workload", "returned int, expected batchpilot.Workload"),
])
def test_any_factory_failure_is_one_line_naming_the_workload(wl_file, fn, expected):
    with pytest.raises(BatchpilotError) as err:
        get_workload(f"{wl_file}:{fn}")
    message = str(err.value)
    assert expected in message and f"{wl_file}:{fn}" in message and "\n" not in message


def test_options_the_factory_does_not_take_are_named_with_the_ones_it_does():
    with pytest.raises(BatchpilotError, match=r"does not accept options \['num_trian'\] .*it takes: num_train, num_val"):
        get_workload("mnist1d-mlp", num_trian=100)


def test_ctrl_c_in_a_factory_is_not_turned_into_an_error(wl_file):
    with pytest.raises(KeyboardInterrupt):
        get_workload(f"{wl_file}:interrupted")


@pytest.mark.parametrize("verb", ["train", "memory"])
def test_cli_exit_2_one_line(wl_file, verb, capsys):
    assert main([verb, "--workload", f"{wl_file}:runtime_error"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"batchpilot {verb}: error:")]
    assert len(lines) == 1 and "failed to build: RuntimeError: CUDA error" in lines[0]
