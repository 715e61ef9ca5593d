"""bench/fsdp_memory.py: two real gloo ranks under FSDP2 against the fake-tensor prediction (issue 16's 8%)."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchpilot.memory.sharding import fsdp_tracing_available

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.slow
@pytest.mark.skipif(not fsdp_tracing_available(), reason="needs FSDP2 and FSDPMemTracker (torch >= 2.6)")
def test_two_gloo_ranks_match_the_prediction_within_8_percent(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the spawned ranks import the worker from there too
    import fsdp_memory

    ranks = fsdp_memory.measure("charlm", 8, True)
    predicted = fsdp_memory.predict("charlm", 8, True)
    assert len(ranks) == 2
    for r in ranks:
        assert predicted.peak_bytes == pytest.approx(r["peak_bytes"], rel=0.08)
