"""Doctor rules: each code fires on its pitfall with the actual values, and stays quiet on the fix."""

from __future__ import annotations

import pytest

from batchpilot.doctor import RULES, check_config
from batchpilot.doctor.context import build_context
from batchpilot.doctor.schema import parse_config

# A complete, clean SGD config: every check runs and none fires.
CLEAN = dict(
    optimizer="sgd", base_batch=64, base_lr=0.1, global_batch=256, lr=0.4, warmup_steps=500,
    micro_batch_per_rank=64, accumulation_steps=4, world_size=1, normalization=["groupnorm"],
    scheduler_step="per_optimizer_step", zero_grad="per_optimizer_step", loss_scaled_by_accumulation=True,
    ema_decay=0.999, ema_step="per_optimizer_step", max_micro_batch=96, validated=True, throughput_measured=True,
)


def findings(**changes):
    cfg = {**CLEAN, **changes}
    return check_config({k: v for k, v in cfg.items() if v is not None})


def by_code(**changes):
    return {f.code: f for f in findings(**changes)}


def test_clean_config_has_no_findings():
    assert findings() == []


def test_every_finding_carries_code_severity_message_reason_source_fix():
    for f in findings(lr=0.1, warmup_steps=0, normalization=["batchnorm"], ema_step="per_micro_batch", validated=False):
        assert f.code in RULES and f.severity in ("error", "warning", "info")
        assert f.message and f.reason and f.source and f.fix and f.title == RULES[f.code].title
        assert "\n" not in f.reason


def test_must_show_config_reports_each_pitfall():
    got = by_code(lr=0.1, warmup_steps=0, normalization=["batchnorm"], micro_batch_per_rank=32,
                  accumulation_steps=8, ema_step="per_micro_batch", validated=None)
    assert got["BP201"].severity == "error" and "0.4" in got["BP201"].message
    assert got["BP206"].severity == "warning" and "4x" in got["BP206"].message
    assert got["BP504"].severity == "warning" and "accumulation_steps 8" in got["BP504"].message
    assert got["BP601"].severity == "error" and "8 times" in got["BP601"].message and "0.992" in got["BP601"].message


# ---- batch geometry and accumulation -------------------------------------------------------------

@pytest.mark.parametrize("changes, needle", [
    (dict(global_batch=250), "!= micro-batch 64 x accumulation 4 x world size 1 = 256"),
    (dict(micro_batch_per_rank=None, accumulation_steps=None, global_batch=255, world_size=2), "does not divide over world size 2"),
    (dict(accumulation_steps=None, micro_batch_per_rank=48), "micro-batch 48 does not divide the per-rank batch 256"),
    (dict(micro_batch_per_rank=None, accumulation_steps=3), "does not divide into accumulation 3"),
])
def test_bp101_batch_does_not_divide(changes, needle):
    f = by_code(**changes)["BP101"]
    assert f.severity == "error" and needle in f.message


def test_geometry_is_derived_from_any_two_numbers():
    ctx, bad = build_context(parse_config(dict(global_batch=256, micro_batch=32, world_size=2)))
    assert not bad and (ctx.accumulation, ctx.per_rank_batch) == (4, 128)
    ctx, _ = build_context(parse_config(dict(global_batch=256, accumulation_steps=2, world_size=2)))
    assert ctx.micro_batch == 64
    ctx, _ = build_context(parse_config(dict(micro_batch=16, accumulation_steps=4, world_size=8)))
    assert ctx.global_batch == 512


def test_bp102_largest_batch_that_fits():
    f = by_code(micro_batch_per_rank=256, accumulation_steps=1, max_micro_batch=256)["BP102"]
    assert f.severity == "warning" and "256" in f.message
    assert "BP102" in by_code(batch_source="max_fit")
    assert "BP102" not in by_code(micro_batch_per_rank=256, accumulation_steps=1, max_micro_batch=256, batch_source="plan")


def test_bp103_micro_batch_over_the_measured_max():
    f = by_code(max_micro_batch=48)["BP103"]
    assert f.severity == "error" and "64 exceeds the measured max_micro_batch 48" in f.message


def test_bp104_accumulation_where_a_larger_micro_batch_fits():
    f = by_code(micro_batch_per_rank=32, accumulation_steps=8, max_micro_batch=130)["BP104"]
    assert f.severity == "info" and "micro_batch_per_rank 128 and accumulation_steps 2" in f.fix


@pytest.mark.parametrize("optimizer, severity", [("sgd", "error"), ("AdamW", "warning")])
def test_bp105_loss_not_scaled(optimizer, severity):
    base = 1e-3 if optimizer == "AdamW" else 0.1
    lr = 2e-3 if optimizer == "AdamW" else 0.4
    f = by_code(optimizer=optimizer, base_lr=base, lr=lr, loss_scaled_by_accumulation=False)["BP105"]
    assert f.severity == severity and "4x" in f.message


def test_bp106_long_accumulation_is_a_note_not_a_staleness_warning():
    got = findings(micro_batch_per_rank=8, accumulation_steps=32, max_micro_batch=8)
    assert [f.code for f in got] == ["BP106"]
    f = got[0]
    assert f.severity == "info" and "exact" in f.message
    assert "stale" not in f.message.lower() and "nothing is stale" in f.reason


def test_bp107_ragged_last_batch():
    f = by_code(dataset_size=1000)["BP107"]
    assert f.severity == "info" and "232 samples" in f.message
    assert "BP107" not in by_code(dataset_size=1000, drop_last=True)
    assert "BP107" not in by_code(dataset_size=1024)


# ---- learning rate -------------------------------------------------------------------------------

NOT_MICRO = dict(micro_batch_per_rank=32, accumulation_steps=8)  # micro-batch != base batch: not BP204


def test_bp201_lr_not_rescaled():
    f = by_code(lr=0.1, **NOT_MICRO)["BP201"]
    assert f.severity == "error" and "expected 0.4 by the linear rule" in f.message
    assert by_code(lr=0.1, lr_rule="none", **NOT_MICRO)["BP201"].severity == "warning"
    assert "BP201" in by_code(lr=0.1, micro_batch_per_rank=256, accumulation_steps=1, max_micro_batch=256, batch_source="tuned")


def test_bp201_uses_sqrt_for_adam():
    f = by_code(optimizer="adamw", base_lr=1e-3, lr=1e-3, **NOT_MICRO)["BP201"]
    assert "expected 0.002 by the sqrt rule" in f.message


def test_bp202_wrong_rule_for_the_optimizer():
    f = by_code(optimizer="adamw", base_lr=1e-3, lr=4e-3)["BP202"]
    assert f.severity == "warning" and "linear rule" in f.message and "0.002" in f.message
    assert "BP202" not in by_code(optimizer="adamw", base_lr=1e-3, lr=2e-3)
    declared = by_code(optimizer="adamw", base_lr=1e-3, lr=4e-3, lr_rule="linear")
    assert "lr_rule is linear" in declared["BP202"].message and "BP203" not in declared
    assert "BP202" not in by_code(lr_rule="linear")  # linear is SGD's rule


def test_bp203_lr_off_the_rule():
    assert by_code(lr=4.0, validated=None)["BP203"].severity == "warning"
    assert by_code(lr=4.0, validated=True)["BP203"].severity == "info"
    assert by_code(lr=0.5)["BP203"].severity == "info"  # 1.25x: close, but not the rule


def test_bp204_lr_tuned_for_the_micro_batch():
    got = by_code(base_batch=64, lr=0.1, micro_batch_per_rank=64, accumulation_steps=4)
    assert got["BP204"].severity == "error" and "BP201" not in got
    assert "optimizer steps on 256" in got["BP204"].message
    scaled = by_code(base_batch=16, base_lr=0.025, lr=0.1, micro_batch_per_rank=64, accumulation_steps=4)
    assert "BP204" in scaled  # 0.1 is the linear LR for batch 64, not 256


def test_bp205_beyond_the_critical_batch():
    f = by_code(noise_scale=64.0)["BP205"]
    assert f.severity == "warning" and "4x the measured noise scale 64" in f.message
    assert "2.5x the samples" in f.message and "0.625x its steps" in f.message
    assert "BP205" not in by_code(noise_scale=1000.0)


@pytest.mark.parametrize("lr, base_batch, severity", [(0.4, 64, "warning"), (0.8, 32, "error"), (0.2, 128, None)])
def test_bp206_no_warmup(lr, base_batch, severity):
    f = by_code(lr=lr, base_batch=base_batch, warmup_steps=0).get("BP206")
    assert (f.severity if f else None) == severity
    assert "BP206" not in by_code(lr=lr, base_batch=base_batch, warmup_steps=100)


def test_bp206_adam_sqrt_4x_is_only_2x_lr():
    assert "BP206" not in by_code(optimizer="adam", base_lr=1e-3, lr=2e-3, warmup_steps=0)


def test_bp206_warmup_hint_in_steps_when_dataset_size_known():
    f = by_code(warmup_steps=0, dataset_size=25600, drop_last=True)["BP206"]
    assert "500 steps" in f.fix


# ---- fine-tuning, validation, measurement -------------------------------------------------------

def test_bp301_bp302_finetune_at_pretraining_batch_and_lr():
    got = by_code(finetune=True, pretrain_batch=256, pretrain_lr=0.4)
    assert got["BP301"].severity == "warning" and "hypothesis" in got["BP301"].fix
    assert got["BP302"].severity == "warning"
    quiet = by_code(finetune=True, pretrain_batch=4096, pretrain_lr=4.0)
    assert "BP301" not in quiet and "BP302" not in quiet


def test_bp401_bp402_bp403_validation_and_measurement():
    got = by_code(validated=None, throughput_measured=None, batch_source="paper")
    assert {"BP401", "BP402", "BP403"} <= set(got)
    assert "4x" in got["BP401"].message
    assert not {"BP401", "BP402"} & set(by_code(validated=None, batch_source="sweep"))


# ---- normalization -------------------------------------------------------------------------------

def test_bp501_small_per_device_batch_for_batchnorm():
    f = by_code(normalization="BatchNorm2d", micro_batch_per_rank=8, accumulation_steps=32)["BP501"]
    assert f.severity == "warning" and "8 samples per device" in f.message
    one = by_code(normalization="bn", micro_batch_per_rank=1, accumulation_steps=256, max_micro_batch=1)["BP501"]
    assert one.severity == "error"
    synced = by_code(normalization=["syncbatchnorm"], micro_batch_per_rank=8, accumulation_steps=8, world_size=4)
    assert "BP501" not in synced and "BP502" not in synced


def test_bp502_bp503_batchnorm_across_devices():
    assert by_code(normalization="batchnorm", micro_batch_per_rank=32, accumulation_steps=2, world_size=4)["BP502"].severity == "warning"
    dp = by_code(normalization="batchnorm", micro_batch_per_rank=32, accumulation_steps=2, world_size=4, parallel="dp", sync_bn=True)
    assert "BP503" in dp and "no effect" in dp["BP503"].message and "BP502" not in dp


def test_bp504_batchnorm_with_accumulation_only():
    assert "BP504" in by_code(normalization="batchnorm")
    assert "BP504" not in by_code(normalization="batchnorm", micro_batch_per_rank=256, accumulation_steps=1, max_micro_batch=512)


# ---- the accumulation loop ------------------------------------------------------------------------

@pytest.mark.parametrize("field, code", [("ema_step", "BP601"), ("scheduler_step", "BP602"), ("zero_grad", "BP603")])
def test_bp60x_per_micro_batch_hooks(field, code):
    f = by_code(**{field: "per_micro_batch"})[code]
    assert f.severity == "error" and "accumulation_steps 4" in f.message
    no_accum = by_code(**{field: "per_micro_batch"}, micro_batch_per_rank=256, accumulation_steps=1, max_micro_batch=512)
    assert code not in no_accum  # without accumulation a micro-batch is an optimizer step


def test_bp602_reports_the_compressed_warmup():
    assert "ends after 125 optimizer steps" in by_code(scheduler_step="per_micro_batch")["BP602"].message


# ---- the config itself ---------------------------------------------------------------------------

def test_bp001_unknown_field_with_suggestion_and_bp002_lists_skipped_checks():
    got = check_config({"global_batch": 256, "lerning_rate": 0.1})
    codes = {f.code: f for f in got}
    assert "did you mean 'learning_rate'" in codes["BP001"].message
    assert "LR scaling" in codes["BP002"].message and "normalization" in codes["BP002"].message
    assert all(f.severity == "info" for f in got)


def test_plan_keys_and_caveats():
    plan = dict(micro_batch_per_rank=64, accumulation_steps=2, world_size=1, global_batch=128, lr=0.002,
                lr_rule="sqrt", warmup_steps=50, noise_scale=300.0, max_micro_batch=64,
                caveats=["LR beyond the measured critical batch", "BN under accumulation"],
                predicted_samples_per_s=1234.5, base_batch=32, base_lr=1e-3)
    got = check_config(plan)
    assert [f.message for f in got if f.code == "BP701"] == plan["caveats"]
    assert "BP001" not in {f.code for f in got}  # extra plan keys are not typos
    assert "BP102" not in {f.code for f in got}  # the planner chose the batch, not "max that fits"


def test_the_contrastive_leak_is_worded_as_a_possibility():
    """Seed 000's SyncBN leak is reported at scale but did not show as a shortcut in docs/claims.md #24: 'can', not 'does'."""
    from batchpilot.doctor.catalog import RULES

    reason = RULES["BP502"].reason
    assert "can also leak" in reason and "claims.md #24" in reason
