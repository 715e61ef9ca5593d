"""Shared fixtures: small, CPU-only, fast."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# The test models are tiny: one intra-op thread is faster than two, and on a shared 2-core
# machine two threads per process oversubscribe the cores (measured 10x slower under load).
# The env var reaches subprocesses (CLI, torchrun); set_num_threads covers this process.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that changes the thread count (e.g. the planner's thread choice) gets it put back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _sigint_raises_keyboard_interrupt():
    """Every test runs with Python's default SIGINT handler, as in a terminal: a test run started in the
    background (``cmd &`` without job control) inherits SIGINT ignored, Python keeps it ignored, and the
    trainer rightly leaves an ignored SIGINT alone, so the tests that send SIGINT would see nothing."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def mlp_workload():
    from batchpilot import get_workload

    return get_workload("mnist1d-mlp", num_train=600, num_val=200)
