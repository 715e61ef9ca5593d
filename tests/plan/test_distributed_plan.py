"""Plans across world sizes: the all-reduce term, the recommended size, one global batch at every size."""

import math

import pytest

from batchpilot import BatchpilotError, get_workload
from batchpilot.cli import main
from batchpilot.cli.plan_cmd import _split_for
from batchpilot.plan import make_plan
from batchpilot.plan.worlds import (
    CommModel, StepTimeWithComm, compatible_world_sizes, elastic_splits, gradient_bytes, measure_allreduce,
    parse_world_sizes,
)
from plan_fakes import fake_curve, fake_probe


@pytest.fixture(scope="module")
def workload():
    return get_workload("mnist1d-mlp", num_train=4000, num_val=100)


def _plan(workload, gbps, sizes=(1, 2, 4, 8)):
    return make_plan(workload, probe=fake_probe(), throughput=fake_curve(), threads=1, world_sizes=list(sizes),
                     allreduce_gbps=gbps).to_dict()


def test_ring_allreduce_time():
    m = CommModel(gradient_bytes=10**9, bus_gbps=100.0, latency_s=1e-5, source="given")
    assert m.allreduce_s(1) == 0.0
    assert m.allreduce_s(2) == pytest.approx(2 * 1 / 2 * 0.01 + 2 * 1e-5)  # 2(W-1)/W * bytes / bw + 2(W-1) lat
    assert m.allreduce_s(8) == pytest.approx(14 / 8 * 0.01 + 14 * 1e-5)
    assert m.allreduce_s(2) < m.allreduce_s(4) < m.allreduce_s(8) < 2 * 0.01 + 1  # bounded by 2x bytes/bw + latency
    with pytest.raises(BatchpilotError, match="bandwidth"):
        CommModel(1, 0.0, 0.0, "x")
    assert StepTimeWithComm(fake_curve(), 0.5).step_s(32, 2) == pytest.approx(fake_curve().step_s(32, 2) + 0.5)


def test_world_size_lists_parse():
    assert parse_world_sizes("8,1,2,4,2") == (1, 2, 4, 8) and parse_world_sizes("4") == (4,)
    for bad in ("0,2", "two", ""):
        with pytest.raises(BatchpilotError, match="world size"):
            parse_world_sizes(bad)


def test_gradient_bytes_counts_trainable_parameters(workload):
    model = workload.make_model()
    assert gradient_bytes(workload) == 4 * sum(p.numel() for p in model.parameters())


def test_fast_links_recommend_more_ranks_and_slow_links_one(workload):
    fast, slow = _plan(workload, 1000.0), _plan(workload, 0.01)
    for d in (fast, slow):
        rows = d["worlds"]["table"]
        assert [r["world_size"] for r in rows] == [1, 2, 4, 8]
        assert all(r["global_batch"] == r["micro_batch_per_rank"] * r["accumulation_steps"] * r["world_size"] for r in rows)
        assert d["world_size"] == d["worlds"]["recommended"]
        top = max(r["goodput"] for r in rows)
        rec = next(r for r in rows if r["world_size"] == d["world_size"])
        assert rec["goodput"] >= 0.95 * top  # within the margin of the best ...
        assert all(r["goodput"] < 0.95 * top for r in rows if r["world_size"] < d["world_size"])  # ... and the smallest
    assert fast["world_size"] > 1 and slow["world_size"] == 1
    slow2 = next(r for r in slow["worlds"]["table"] if r["world_size"] == 2)
    assert slow2["allreduce_s"] > 0.5 * slow2["step_s"]  # the slow link's all-reduce dominates the step
    assert slow2["step_s"] == pytest.approx(fake_curve().step_s(slow2["micro_batch_per_rank"], slow2["accumulation_steps"])
                                            + slow2["allreduce_s"])
    assert any("ring all-reduce" in c for c in fast["caveats"])


def test_the_chosen_global_batch_keeps_its_size_at_other_world_sizes(workload):
    d = _plan(workload, 1000.0)
    batch = d["global_batch"]
    for e in d["worlds"]["elastic"]:
        if e["compatible"]:
            assert e["micro_batch_per_rank"] * e["accumulation_steps"] * e["world_size"] == batch
            assert e["micro_batch_per_rank"] <= d["max_micro_batch"]
    assert d["worlds"]["compatible_world_sizes"] == [w for w in range(1, batch + 1) if batch % w == 0]


def test_elastic_splits_absorb_the_world_size_in_accumulation():
    def model(w):
        return StepTimeWithComm(fake_curve(), 0.0)
    splits = {e["world_size"]: e for e in elastic_splits(256, [1, 2, 3, 4, 8], max_micro_batch=64, step_model=model)}
    assert (splits[1]["micro_batch_per_rank"], splits[1]["accumulation_steps"]) == (64, 4)
    assert (splits[2]["micro_batch_per_rank"], splits[2]["accumulation_steps"]) == (64, 2)
    assert (splits[4]["micro_batch_per_rank"], splits[4]["accumulation_steps"]) == (64, 1)
    assert (splits[8]["micro_batch_per_rank"], splits[8]["accumulation_steps"]) == (32, 1)
    assert not splits[3]["compatible"]
    assert compatible_world_sizes(12) == [1, 2, 3, 4, 6, 12]


def test_train_plan_takes_the_split_for_its_world_size():
    plan = {"global_batch": 256, "micro_batch_per_rank": 64, "accumulation_steps": 1, "world_size": 4,
            "worlds": {"elastic": [{"world_size": 2, "compatible": True, "micro_batch_per_rank": 128,
                                    "accumulation_steps": 1}]}}
    assert _split_for(plan, 2, "p") == {"world_size": 2, "micro_batch_per_rank": 128, "accumulation_steps": 1}
    assert _split_for(plan, 1, "p") == {"world_size": 1, "micro_batch_per_rank": 64, "accumulation_steps": 4}
    with pytest.raises(BatchpilotError, match="does not divide over 3 ranks"):
        _split_for(plan, 3, "p")


def test_allreduce_is_measured_with_gloo_between_two_processes():
    m = measure_allreduce(1 << 20, repeats=3)
    assert m.gradient_bytes == 1 << 20 and m.source.startswith("measured: gloo")
    assert m.bus_gbps > 0 and math.isfinite(m.bus_gbps) and m.latency_s > 0
    assert 0 < m.allreduce_s(2) < m.allreduce_s(8)


def test_plan_cli_rejects_bad_world_sizes(capsys):
    assert main(["plan", "--world-size", "0,2", "--no-report"]) == 2
    assert "world sizes must be integers >= 1" in capsys.readouterr().err
    assert main(["plan", "--world-size", "2", "--allreduce-gbps", "0", "--no-report"]) == 2
