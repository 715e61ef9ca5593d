"""Plans under FSDP: the collectives' volume and time, and the planner's picks with them (fake memory, fake timings)."""

from __future__ import annotations

import pytest

from batchpilot import BatchpilotError, get_workload
from batchpilot.memory.curve import MemoryCurve
from batchpilot.memory.sharded import ShardedMemory
from batchpilot.memory.sharding import ShardingConfig
from batchpilot.plan import make_plan
from batchpilot.plan import sharded_worlds as sw
from batchpilot.plan.worlds import CommModel
from plan_fakes import fake_curve, fake_probe

STATE_BYTES = 3e8
"""The fake model's states (params, grads, Adam): 1.5x the budget below, so one rank cannot hold them."""
BUDGET = "200MB"


def test_collective_volume_and_time():
    c = sw.ShardedCommModel(param_bytes=10**9, grad_bytes=10**9, units=4, reshard_after_forward=True,
                            bus_gbps=100.0, latency_s=1e-5, source="given")
    assert c.per_micro_s(1) == 0.0
    v = c.volume_bytes(8)
    assert v == {"all_gather_forward_bytes": 7 / 8 * 1e9, "all_gather_backward_bytes": 7 / 8 * 1e9,
                 "reduce_scatter_bytes": 7 / 8 * 1e9}
    assert c.per_micro_s(8) == pytest.approx(3 * 7 / 8 * 0.01 + 3 * 4 * 7 * 1e-5)
    zero2 = sw.ShardedCommModel(10**9, 10**9, 4, False, 100.0, 0.0, "given")
    assert zero2.volume_bytes(8)["all_gather_backward_bytes"] == 0
    assert zero2.per_micro_s(8) == pytest.approx(2 * 7 / 8 * 0.01)
    # one all-gather + one reduce-scatter move as much as DDP's all-reduce; resharding adds one more all-gather
    ddp = CommModel(10**9, 100.0, 0.0, "given")
    assert zero2.per_micro_s(8) == pytest.approx(ddp.allreduce_s(8))
    step = sw.ShardedStepTime(fake_curve(), 0.5)
    assert step.step_s(32, 4) == pytest.approx(fake_curve().step_s(32, 4) + 4 * 0.5)
    for bad in (dict(units=0), dict(bus_gbps=0.0), dict(param_bytes=-1)):
        with pytest.raises(BatchpilotError):
            sw.ShardedCommModel(**{**dict(param_bytes=1, grad_bytes=1, units=1, reshard_after_forward=True,
                                          bus_gbps=1.0, latency_s=0.0, source="x"), **bad})


def _fake_fsdp_memory(workload, world_sizes, spec, *, reshard_after_forward=True, amp=False):
    """States / W + 1 MB in flight + 40 kB per sample, as a traced FSDP curve would give."""
    mems = {}
    for w in world_sizes:
        fixed = STATE_BYTES / w + 1e6
        curve = MemoryCurve(fixed_bytes=fixed, per_sample_bytes=4e4, peak_bytes_at={1: int(fixed + 4e4),
                            64: int(fixed + 64 * 4e4)}, breakdown={"sharded_params": int(STATE_BYTES / w / 4)},
                            method="fake", residual_frac=0.0)
        mems[w] = ShardedMemory(ShardingConfig("fsdp", w, reshard_after_forward), curve, units=("0", "1", ""))
    return sw.FsdpMemory(mems, {w: m.max_micro_batch(spec.usable_bytes) for w, m in mems.items()},
                         reshard_after_forward)


@pytest.fixture()
def fake_memory(monkeypatch):
    monkeypatch.setattr(sw, "fsdp_memory", _fake_fsdp_memory)


@pytest.fixture(scope="module")
def workload():
    return get_workload("mnist1d-mlp", num_train=4000, num_val=100)


def _plan(workload, gbps, sizes=(1, 2, 4, 8), memory="1GiB", **kw):
    return make_plan(workload, probe=fake_probe(), throughput=fake_curve(), threads=1, world_sizes=list(sizes),
                     allreduce_gbps=gbps, confirm=False, strategy="fsdp", device="cpu", memory=memory, **kw).to_dict()


def test_one_rank_that_cannot_hold_the_states_is_left_out(workload, fake_memory):
    d = _plan(workload, 1000.0, memory=BUDGET)
    w = d["worlds"]
    assert w["strategy"] == "fsdp" and w["not_fitting"] == [1]
    rows = w["table"]
    assert [r["world_size"] for r in rows] == [2, 4, 8]
    assert rows[0]["max_micro_batch_per_rank"] < rows[1]["max_micro_batch_per_rank"] < rows[2]["max_micro_batch_per_rank"]
    for r in rows:
        assert r["global_batch"] == r["micro_batch_per_rank"] * r["accumulation_steps"] * r["world_size"]
        assert r["micro_batch_per_rank"] <= r["max_micro_batch_per_rank"]
        comm = r["accumulation_steps"] * (r["all_gather_forward_bytes"] + r["all_gather_backward_bytes"]
                                          + r["reduce_scatter_bytes"]) / 1000e9
        assert r["comm_s"] == pytest.approx(comm, rel=1e-6)
        assert r["step_s"] == pytest.approx(fake_curve().step_s(r["micro_batch_per_rank"], r["accumulation_steps"])
                                            + r["comm_s"])
    assert d["world_size"] == w["recommended"] and d["world_size"] >= 2
    assert d["micro_batch_per_rank"] <= w["table"][[r["world_size"] for r in rows].index(d["world_size"])][
        "max_micro_batch_per_rank"]


def test_fast_links_recommend_more_ranks_and_slow_links_fewer(workload, fake_memory):
    fast, slow = _plan(workload, 1000.0), _plan(workload, 0.01)
    assert fast["world_size"] > 1 and slow["world_size"] == 1
    assert any("reduce-scatters the gradients" in c for c in fast["caveats"])
    slow2 = next(r for r in slow["worlds"]["table"] if r["world_size"] == 2)
    assert slow2["comm_s"] > 0.5 * slow2["step_s"]


def test_ddp_is_compared_where_it_fits(workload, fake_memory, tmp_path, capsys, monkeypatch):
    from batchpilot.cli.plan_cmd import render_plan
    from batchpilot.report.plan_report import write_plan_report

    d = _plan(workload, 1.0)
    monkeypatch.setenv("COLUMNS", "200")
    render_plan(d, tmp_path, report=False, written=False)
    text = capsys.readouterr().out
    assert "fsdp (ZeRO-3) by world size" in text and "ddp goodput" in text
    write_plan_report(d, tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert "DDP goodput" in html and "all-gather + reduce-scatter" in html
    assert not any("ring all-reduce" in c for c in d["caveats"])
    for r in d["worlds"]["table"]:
        assert r["ddp"] is not None and r["faster"] in ("ddp", "fsdp", "same")
        if r["world_size"] > 1:  # resharding adds a third collective: FSDP moves 1.5x DDP's bytes
            assert r["comm_s"] / r["accumulation_steps"] > r["ddp"]["allreduce_s"]
    assert any(r["faster"] == "ddp" for r in d["worlds"]["table"])


def test_nothing_fits_anywhere_is_a_clear_error(workload, fake_memory):
    with pytest.raises(BatchpilotError, match="not even a micro-batch of 1"):
        sw.compare_strategies([1], lambda w: None, lambda w: None,
                              sw.ShardedCommModel(1, 1, 1, True, 1.0, 0.0, "x"), CommModel(1, 1.0, 0.0, "x"), {1: 0}, 0)


def test_bad_strategy_is_refused(workload):
    with pytest.raises(BatchpilotError, match="strategy must be ddp or fsdp"):
        make_plan(workload, probe=fake_probe(), throughput=fake_curve(), strategy="zero3")


def test_train_plan_takes_fsdp_from_an_fsdp_plan_only_with_two_ranks(workload, fake_memory, tmp_path, monkeypatch):
    """``train --plan`` on an FSDP plan shards (with the plan's resharding) when it has >= 2 ranks; an explicit
    ``--strategy`` wins, and one process stays unsharded (FSDP needs two ranks)."""
    import dataclasses
    import json

    from batchpilot.cli import build_parser
    from batchpilot.cli.plan_cmd import apply_plan_to_train_args

    plan = make_plan(workload, probe=fake_probe(), throughput=fake_curve(), threads=1, world_sizes=[2, 4],
                     allreduce_gbps=1000.0, confirm=False, strategy="fsdp", device="cpu", memory=BUDGET,
                     reshard_after_forward=False)
    spec = {"kind": "builtin", "name": "mnist1d-mlp", "options": {"num_train": 4000, "num_val": 100}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(dataclasses.replace(plan, workload_spec=spec).to_dict()))

    def args_for(*extra):
        return build_parser().parse_args(["train", "--plan", str(path), *extra])

    two = args_for("--nproc", "2")
    apply_plan_to_train_args(two)
    assert two.strategy == "fsdp" and two.reshard_after_forward is False
    explicit = args_for("--nproc", "2", "--strategy", "ddp")
    apply_plan_to_train_args(explicit)
    assert explicit.strategy == "ddp"
    one = args_for()
    apply_plan_to_train_args(one)
    assert one.strategy is None  # the trainer's default, ddp: one process shards nothing
