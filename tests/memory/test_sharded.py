"""Memory per rank under FSDP2: the config's errors, the units, the traced breakdown and how it scales with N."""

from __future__ import annotations

import json

import pytest

from batchpilot.cli import main
from batchpilot.errors import BatchpilotError
from batchpilot.memory.sharded import memory_by_world, sharded_memory
from batchpilot.memory.sharded_trace import CATEGORIES, SHARDED_STATES, trace_sharded_step
from batchpilot.memory.sharding import ShardingConfig, fsdp_tracing_available, fsdp_units
from batchpilot.workloads import get_workload

needs_fsdp = pytest.mark.skipif(not fsdp_tracing_available(), reason="needs FSDP2 and FSDPMemTracker (torch >= 2.6)")
TINY = ["--workload", "charlm", "--workload-opt", "seq_len=16"]


@pytest.fixture(scope="module")
def charlm():
    return get_workload("charlm", seq_len=16)


@pytest.fixture(scope="module")
def traces(charlm):
    return {w: trace_sharded_step(charlm, 4, ShardingConfig("fsdp", w)) for w in (1, 2, 4)}


@pytest.mark.parametrize("kwargs, message", [
    ({"strategy": "fsdp", "world_size": 0}, "positive integer"),
    ({"strategy": "zero", "world_size": 2}, "strategy must be one of"),
    ({"strategy": "ddp", "world_size": 2, "cpu_offload": True}, "--cpu-offload applies to --strategy fsdp"),
    ({"strategy": "ddp", "world_size": 2, "reshard_after_forward": False}, "applies to --strategy fsdp"),
    ({"strategy": "fsdp", "world_size": True}, "positive integer"),
])
def test_bad_configs_are_clear_errors(kwargs, message):
    with pytest.raises(BatchpilotError, match=message):
        ShardingConfig(**kwargs)


def test_one_rank_fsdp_is_allowed_and_says_it_shards_nothing():
    assert "shards nothing" not in ShardingConfig("fsdp", 2).describe()
    assert "nothing is sharded" in ShardingConfig("fsdp", 1).describe()


def test_units_are_the_blocks_then_the_root(charlm):
    import torch

    with torch.random.fork_rng(devices=[]):
        assert fsdp_units(charlm.make_model()) == ["blocks.0", "blocks.1", ""]
        assert fsdp_units(torch.nn.Sequential(torch.nn.Linear(2, 2))) == [""]


@needs_fsdp
def test_breakdown_sums_to_the_peak(traces):
    for t in traces.values():
        assert set(t.breakdown) == set(CATEGORIES)
        assert sum(t.breakdown.values()) == t.peak_bytes
        assert t.units == ("blocks.0", "blocks.1", "")


@needs_fsdp
def test_sharded_states_scale_as_one_over_n(traces):
    one = traces[1].breakdown
    for w in (2, 4):
        b = traces[w].breakdown
        for key in ("sharded_params", "optimizer_state"):
            assert b[key] * w == pytest.approx(one[key], rel=0.01), (key, w)
    assert traces[4].peak_bytes < traces[2].peak_bytes < traces[1].peak_bytes


@needs_fsdp
def test_keeping_parameters_after_forward_holds_more_in_flight(charlm, traces):
    kept = trace_sharded_step(charlm, 4, ShardingConfig("fsdp", 4, reshard_after_forward=False))
    assert kept.breakdown["unsharded_params"] > traces[4].breakdown["unsharded_params"]
    assert kept.peak_bytes > traces[4].peak_bytes


@needs_fsdp
def test_cpu_offload_takes_the_sharded_states_off_the_device(charlm, traces):
    off = trace_sharded_step(charlm, 4, ShardingConfig("fsdp", 4, cpu_offload=True))
    states = sum(traces[4].breakdown[k] for k in SHARDED_STATES)
    assert off.host_bytes >= states * 0.99
    assert off.peak_bytes <= traces[4].peak_bytes - traces[4].breakdown["sharded_params"]


@needs_fsdp
@pytest.mark.slow
def test_curve_per_world_and_largest_micro_batch(charlm):
    mems = memory_by_world(charlm, [1, 4], batch_sizes=[1, 4])
    assert set(mems) == {1, 4}
    budget = mems[1].curve.peak_bytes(4) * 1.001
    assert mems[1].max_micro_batch(budget) == 4
    assert mems[4].max_micro_batch(budget) >= 4
    ddp = sharded_memory(charlm, ShardingConfig("ddp", 4), batch_sizes=[1, 4])
    assert ddp.units == () and ddp.curve.peak_bytes(1) > 0


@needs_fsdp
def test_cli_json_carries_the_sharded_breakdown(capsys):
    assert main(["memory", *TINY, "--strategy", "fsdp", "--world-size", "2,4", "--device", "H100", "--json",
                 "--batch-sizes", "4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["strategy"] == "fsdp" and data["sharding"]["world_size"] == 4
    assert data["units"] == ["blocks.0", "blocks.1", "<root>"]
    assert set(data["groups"]) == {"sharded_states", "in_flight", "activations", "temporaries", "inputs"}
    assert sum(data["breakdown"].values()) == data["per_rank"]["curve"]["peak_bytes_at"]["4"]
    assert [r["world_size"] for r in data["by_world"]] == [2, 4]
    assert data["by_world"][0]["sharded_states_bytes"] > data["by_world"][1]["sharded_states_bytes"]
    assert data["max_micro_batch"] > 1000 and data["replicated"]["max_micro_batch"] > 1000


@pytest.mark.parametrize("argv, message", [
    (["--strategy", "fsdp", "--world-size", "0"], "world sizes must be integers >= 1"),
    (["--strategy", "ddp", "--world-size", "2", "--cpu-offload"], "--cpu-offload applies to --strategy fsdp"),
    (["--strategy", "fsdp", "--world-size", "two"], "world size must be an integer"),
])
def test_cli_bad_input(argv, message, capsys):
    assert main(["memory", *TINY, *argv, "--json"]) == 2
    assert message in capsys.readouterr().err


@needs_fsdp
def test_dtensor_shape_inference_is_not_charged_to_the_rank(charlm):
    """DTensor infers the optimizer's output shapes on global-shape fake tensors the first time it sees an op:
    not memory of the rank (a world size no other test uses, so its propagation cache is cold)."""
    t = trace_sharded_step(charlm, 2, ShardingConfig("fsdp", 3))
    assert t.phase_peak_bytes["step1.optimizer"] <= t.phase_peak_bytes["step2.optimizer"]


def test_ddp_json_says_it_is_the_memory_per_rank(capsys):
    small = ["--workload", "mnist1d-mlp", "--workload-opt", "num_train=200", "--workload-opt", "num_val=50"]
    assert main(["memory", *small, "--world-size", "4", "--json", "--no-what-if", "--batch-sizes", "16,32"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sharding"] == {"strategy": "ddp", "world_size": 4, "reshard_after_forward": True, "cpu_offload": False}


@needs_fsdp
def test_an_untraceable_model_is_a_clear_error():
    import dataclasses

    import torch

    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x) if x.sum().item() > 0 else self.lin(-x)  # .item() cannot run on fake tensors

    base = get_workload("mnist1d-mlp", num_train=200, num_val=50)
    data = [(torch.ones(4), torch.tensor(0))] * 8
    w = dataclasses.replace(base, make_model=DataDependent, train_data=data, val_data=data)
    with pytest.raises(BatchpilotError, match="fake-tensor FSDP trace failed"):
        sharded_memory(w, ShardingConfig("fsdp", 2), batch_sizes=[2])
