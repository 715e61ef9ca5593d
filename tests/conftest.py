"""Shared fixtures: small, CPU-only, fast."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def mlp_workload():
    from batchpilot import get_workload

    return get_workload("mnist1d-mlp", num_train=600, num_val=200)
