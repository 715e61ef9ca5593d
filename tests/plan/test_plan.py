"""The planner's core: efficiency, effective noise scale, warmup, search, predictions, plan files, caveats."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest

from batchpilot.errors import BatchpilotError
from batchpilot.plan import goodput as gp
from batchpilot.plan.probe import NoisePoint, NoiseProbe, phase_noise_scales, probe_micro_batch
from batchpilot.plan.result import Plan, read_plan, write_plan
from batchpilot.plan.text import caveats_for, lr_rule_note


@dataclass
class FakeThroughput:
    """step_s = accumulation·(overhead + per_sample·micro) + optimizer."""

    overhead_s: float
    per_sample_s: float
    optimizer: float = 0.0

    def step_s(self, micro_batch: int, accumulation_steps: int = 1) -> float:
        return accumulation_steps * (self.overhead_s + self.per_sample_s * micro_batch) + self.optimizer


@dataclass
class FakeMemory:
    fixed: float
    per_sample: float

    def peak_bytes(self, micro_batch: int) -> float:
        return self.fixed + self.per_sample * micro_batch

    def max_micro_batch(self, budget: float) -> int:
        return max(0, int((budget - self.fixed) // self.per_sample))


def _search(throughput, *, b_noise=100.0, max_micro=1024, max_global=4096, anchor=None, rule="linear", world=1):
    micro = [2**i for i in range(0, 13)]
    return gp.search(micro_choices=micro, world_size=world, max_micro_batch=max_micro, max_global_batch=max_global,
                     throughput=throughput, memory=FakeMemory(1e6, 1e3), b_noise=b_noise, base_batch=32, base_lr=0.1,
                     lr_rule=rule, anchor=anchor, steps_per_epoch_base=100)


def test_efficiency_is_pollux():
    assert gp.efficiency(32, 100, 32) == 1.0
    assert gp.efficiency(132, 100, 32) == pytest.approx(132 / 232)
    assert gp.efficiency(16, 100, 32) > 1.0
    assert gp.efficiency(10_000, math.inf, 32) == 1.0
    with pytest.raises(BatchpilotError):
        gp.efficiency(0, 100, 32)
    with pytest.raises(BatchpilotError):
        gp.efficiency(32, float("nan"), 32)


def test_effective_noise_scale_reproduces_the_samples_of_every_phase():
    phases = [(1000, 50.0), (3000, 200.0), (6000, 800.0)]  # (samples seen at base batch, B_noise)
    b0 = 32
    b_eff = gp.effective_noise_scale(phases, b0)
    # E_min per phase from the samples each phase took at B0, then E(B) both ways
    prev, e_mins = 0, []
    for s, b in phases:
        e_mins.append(((s - prev) / (1 + b0 / b), b))
        prev = s
    for batch in (8, 32, 256, 4096):
        direct = sum(e * (1 + batch / b) for e, b in e_mins)
        assert sum(e for e, _ in e_mins) * (1 + batch / b_eff) == pytest.approx(direct)
    assert 50 < b_eff < 800
    assert gp.effective_noise_scale([(100, 70.0), (200, 70.0)], b0) == pytest.approx(70.0)
    assert gp.effective_noise_scale([(100, math.inf)], b0) == math.inf
    assert math.isnan(gp.effective_noise_scale([(100, -5.0)], b0))


def test_warmup_grows_with_the_jump():
    assert gp.warmup_steps_for(32, 32, 1000) == 0
    assert gp.warmup_steps_for(16, 32, 1000) == 0
    w = [gp.warmup_steps_for(32 * 2**k, 32, 1000) for k in range(1, 8)]
    assert w == sorted(w) and w[0] > 0 and w[-1] > w[0]
    assert gp.warmup_steps_for(32 * 32, 32, 1000) == 60  # 6% of the run at a 32x jump, as in Goyal et al.


def test_optimal_is_not_the_maximum_when_throughput_saturates():
    # per-sample cost dominates beyond ~100: samples/s saturates while efficiency keeps falling
    cands = _search(FakeThroughput(0.01, 1e-4))
    best = gp.choose(cands)
    assert 32 < best.global_batch < 4096
    assert best.goodput >= (1 - gp.TIE_FLOOR) * max(c.goodput for c in cands)
    for c in cands:
        assert c.global_batch == c.micro_batch_per_rank * c.accumulation_steps * c.world_size
        assert c.goodput == pytest.approx(c.samples_per_s * c.efficiency)


def test_pure_overhead_and_huge_noise_scale_pick_the_largest():
    cands = _search(FakeThroughput(0.01, 1e-9), b_noise=1e9, max_micro=4096)
    assert gp.choose(cands).global_batch == 4096


def test_constant_samples_per_s_picks_the_smallest():
    cands = _search(FakeThroughput(0.0, 1e-4))
    chosen = gp.choose(cands)
    assert chosen.global_batch <= 2  # 1 is the best; 2 trails it by 1%, a tie that goes to the larger batch
    assert chosen in gp.ties(cands)


def test_memory_limit_forces_accumulation():
    cands = _search(FakeThroughput(0.01, 1e-4), max_micro=64)
    assert all(c.micro_batch_per_rank <= 64 for c in cands)
    big = [c for c in cands if c.global_batch > 64]
    assert big and all(c.accumulation_steps == c.global_batch // c.micro_batch_per_rank > 1 for c in big)
    with pytest.raises(BatchpilotError):
        _search(FakeThroughput(0.01, 1e-4), max_micro=0)


def test_world_size_multiplies_the_global_batch():
    cands = _search(FakeThroughput(0.01, 1e-4), world=4)
    assert all(c.global_batch % 4 == 0 and c.world_size == 4 for c in cands)


def test_predictions_follow_the_anchor_and_the_lr_rule():
    cands = {c.global_batch: c for c in _search(FakeThroughput(0.01, 1e-4), anchor=(32, 32_000.0))}
    base = cands[32]
    assert base.steps_to_target == 1000 and base.warmup_steps == 0 and base.lr == pytest.approx(0.1)
    c = cands[128]  # E(128) = 32000·(100+128)/(100+32)
    plain = math.ceil(32_000 * 228 / 132 / 128)
    assert c.steps_to_target == plain + c.warmup_steps // 2
    assert c.time_to_target_s == pytest.approx(c.steps_to_target * c.step_s)
    assert c.lr == pytest.approx(0.4)
    sqrt = {c.global_batch: c for c in _search(FakeThroughput(0.01, 1e-4), rule="sqrt")}
    assert sqrt[128].lr == pytest.approx(0.2)


def _plan(**over) -> Plan:
    fields = dict(
        workload="w", micro_batch_per_rank=64, accumulation_steps=2, world_size=1, global_batch=128, lr=0.2,
        lr_rule="linear", warmup_steps=5, schedule="constant", noise_scale=100.0, noise_scale_low=80.0,
        noise_scale_high=float("inf"), samples_per_s=1000.0, efficiency=0.6, goodput=600.0, peak_bytes=1e6,
        max_micro_batch=64, caveats=("c",), base_batch=32, base_lr=0.05, device="cpu", usable_bytes=10**9,
        target="val_acc>=0.9", predicted_steps_to_target=None, predicted_time_to_target_s=None, lr_rule_note="n",
        noise_note="n", why="w", threads=1)
    fields.update(over)
    return Plan(**fields)


def test_plan_json_round_trip_is_strict_and_consistent(tmp_path):
    path = write_plan(_plan(), tmp_path / "plan.json")
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    data = read_plan(path)
    assert data["global_batch"] == data["micro_batch_per_rank"] * data["accumulation_steps"] * data["world_size"]
    assert data["noise_scale_high"] is None
    with pytest.raises(BatchpilotError):
        _plan(global_batch=100)


def test_read_plan_errors_name_the_problem(tmp_path):
    with pytest.raises(BatchpilotError, match="does not exist"):
        read_plan(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BatchpilotError, match="JSON"):
        read_plan(bad)
    data = _plan().to_dict()
    data["global_batch"] = 100
    bad.write_text(json.dumps(data))
    with pytest.raises(BatchpilotError, match="global_batch"):
        read_plan(bad)
    del data["lr"]
    bad.write_text(json.dumps(data))
    with pytest.raises(BatchpilotError, match="lacks lr"):
        read_plan(bad)


def _probe(**over) -> NoiseProbe:
    fields = dict(points=(NoisePoint(10, 320, 90.0, 70.0, 120.0, 0.5),), batch=32, micro_batch=16,
                  units_per_sample=1.0, phases=((320, 90.0),), b_noise_effective=90.0, b_noise_low=70.0,
                  b_noise_high=120.0, b_noise_last=95.0, steps_to_target=10, samples_to_target=320, time_to_target_s=1.0, steps=10,
                  wall_s=1.0, status="target_reached")
    fields.update(over)
    return NoiseProbe(**fields)


class _Spec:
    kind, name = "cpu", "cpu"


class _Curve:
    peak_bytes_at = {8: 1000.0, 64: 5000.0}

    def peak_bytes(self, b):
        return 1000.0 if b == 8 else 8000.0  # exact at 8, 60% off at 64


def _caveats(chosen, *, batchnorm=False, probe=None, b_noise=90.0):
    from batchpilot.workloads import get_workload

    w = get_workload("mnist1d-mlp", num_train=200, num_val=50)
    thr = type("T", (), {"points": (), "truncated_at": None, "batches": [chosen.micro_batch_per_rank]})()
    return caveats_for(workload=w, chosen=chosen, probe=probe or _probe(), throughput=thr, curve=_Curve(),
                       batchnorm=batchnorm, measured_on="cpu", spec=_Spec(), candidates=[chosen], world_size=1,
                       b_noise_used=b_noise)


def test_caveats_flag_batchnorm_and_lr_beyond_the_critical_batch():
    cands = {c.global_batch: c for c in _search(FakeThroughput(0.01, 1e-4), max_micro=8)}
    accumulated = cands[64]  # micro 8 x 8
    text = " ".join(_caveats(accumulated, batchnorm=True))
    assert "BatchNorm under accumulation" in text and "small per-device batch" in text
    assert "compare with SyncBatchNorm or GroupNorm in a sweep" in text  # a hypothesis to test (claims #27), not an order
    assert "beyond the measured critical batch" not in text
    text = " ".join(_caveats(cands[256], b_noise=90.0))
    assert "beyond the measured critical batch" in text and "BatchNorm" not in text
    text = " ".join(_caveats(cands[8], probe=_probe(samples_to_target=None, status="budget")))
    # a probe that stopped short is not a dead end: make_plan extrapolates and says by how much
    assert "not predicted" not in text and "M(B)" not in text
    micro64 = {c.global_batch: c for c in _search(FakeThroughput(0.01, 1e-4), max_micro=64)}[64]
    assert micro64.micro_batch_per_rank == 64
    assert "60% off the traced peak at micro-batch 64" in " ".join(_caveats(micro64))


def test_lr_rule_note_says_where_it_stops_holding():
    note = lr_rule_note("sqrt", 100.0, 512)
    assert "Malladi" in note and "critical batch" in note and "beyond it" in note
    assert "Goyal" in lr_rule_note("linear", 100.0, 64)


def test_probe_helpers():
    assert probe_micro_batch(32) == 16
    assert probe_micro_batch(256) == 64
    assert probe_micro_batch(6) == 3
    with pytest.raises(BatchpilotError):
        probe_micro_batch(1)
    history = [(1.0, 100.0)] * 100 + [(1.0, 300.0)] * 100
    phases = phase_noise_scales(history, list(range(32, 32 * 201, 32)), 1.0)
    assert [round(b) for _, b in phases] == [100, 300]
    # tokens: B_noise in units divided by units per sample
    assert phase_noise_scales(history[:100], list(range(1, 101)), 64.0)[0][1] == pytest.approx(100 / 64)


@dataclass
class UncertainThroughput(FakeThroughput):
    """FakeThroughput whose step-time ratios are known only to ``u`` (log)."""

    u: float = 0.0

    def log_ratio_uncertainty(self, a: int, b: int) -> float:
        return 0.0 if a == b else self.u


def test_ties_go_to_no_accumulation_then_the_larger_batch():
    exact = _search(UncertainThroughput(0.01, 1e-4, u=0.0))
    noisy = _search(UncertainThroughput(0.01, 1e-4, u=0.3))
    best = max(exact, key=lambda c: c.goodput)
    assert gp.choose(exact, UncertainThroughput(0.01, 1e-4, u=0.0)).global_batch >= best.global_batch
    tie = gp.ties(noisy, UncertainThroughput(0.01, 1e-4, u=0.3))
    chosen = gp.choose(noisy, UncertainThroughput(0.01, 1e-4, u=0.3))
    assert len(tie) > len(gp.ties(exact, UncertainThroughput(0.01, 1e-4, u=0.0)))
    assert chosen.global_batch == max(c.global_batch for c in tie if c.accumulation_steps == 1)
    for c in tie:  # the tie is capped: never a batch predicted more than TIE_CAP slower
        assert math.log(best.goodput / c.goodput) <= gp.TIE_CAP + 1e-12


def test_accumulation_only_when_measurably_faster():
    # a big per-step overhead makes micro 256 x 2 slower than 512 x 1: no accumulation either way
    plain = _search(UncertainThroughput(0.01, 1e-4, u=0.05))
    assert all(c.accumulation_steps == 1 for c in plain if c.global_batch <= 1024)
    # superlinear cost per sample above 64 (cache spill): 64 x k is much faster than one big micro-batch

    @dataclass
    class Spill(UncertainThroughput):
        def step_s(self, micro_batch, accumulation_steps=1):
            per = self.per_sample_s * (1 if micro_batch <= 64 else 4)
            return accumulation_steps * (self.overhead_s + per * micro_batch)

    spill = _search(Spill(0.0001, 1e-4, u=0.05))
    big = {c.global_batch: c for c in spill}
    assert big[1024].accumulation_steps > 1 and big[1024].micro_batch_per_rank <= 64
    # ...but not when the gain is inside the timing uncertainty
    unsure = {c.global_batch: c for c in _search(Spill(0.0001, 1e-4, u=3.0))}
    assert unsure[1024].accumulation_steps == 1


def test_a_batch_that_fits_whole_is_not_split_because_it_was_not_timed():
    from batchpilot.plan.build import micro_batch_choices

    choices = micro_batch_choices([8, 16, 32, 64, 128], max_micro=600, num_train=4000)
    assert choices == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert micro_batch_choices([8, 16, 32], max_micro=20, num_train=4000) == [1, 2, 4, 8, 16]
    cands = gp.search(micro_choices=choices, world_size=1, max_micro_batch=600, max_global_batch=4000,
                      throughput=UncertainThroughput(0.01, 1e-4, u=0.05), memory=FakeMemory(1e6, 1e3), b_noise=1e9,
                      base_batch=32, base_lr=0.1, lr_rule="linear", anchor=None, steps_per_epoch_base=100)
    assert {c.global_batch: c.accumulation_steps for c in cands}[512] == 1
