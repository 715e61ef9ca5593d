"""Property tests (hypothesis): over random configs the doctor never crashes and always prints valid JSON."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchpilot.cli import main
from batchpilot.doctor import RULES, SEVERITIES, check_config, exit_code
from batchpilot.doctor.schema import _ALIASES, BATCH_SOURCES, FIELDS, NORMS, PARALLEL, STEP_WHEN
from batchpilot.errors import BatchpilotError

positive_int = st.integers(min_value=1, max_value=4096)
lr_value = st.floats(min_value=1e-6, max_value=10.0)
VALID = {
    "global_batch": positive_int, "micro_batch_per_rank": positive_int, "accumulation_steps": st.integers(1, 64),
    "world_size": st.integers(1, 64), "lr": lr_value, "base_batch": positive_int, "base_lr": lr_value,
    "lr_rule": st.sampled_from(["linear", "sqrt", "none"]), "warmup_steps": st.integers(0, 5000),
    "optimizer": st.sampled_from(["sgd", "SGD", "adam", "AdamW", "lamb", "lars", "rmsprop", "my_opt"]),
    "scheduler_step": st.sampled_from(STEP_WHEN), "ema_step": st.sampled_from(STEP_WHEN),
    "ema_decay": st.floats(min_value=0.5, max_value=0.99999), "zero_grad": st.sampled_from(STEP_WHEN),
    "loss_scaled_by_accumulation": st.booleans(),
    "normalization": st.one_of(st.sampled_from(NORMS), st.lists(st.sampled_from(NORMS + ("bn", "LN", "batch_norm")), max_size=3)),
    "sync_bn": st.booleans(), "parallel": st.sampled_from(PARALLEL), "finetune": st.booleans(),
    "pretrain_batch": positive_int, "pretrain_lr": lr_value, "validated": st.booleans(),
    "throughput_measured": st.booleans(), "batch_source": st.sampled_from(BATCH_SOURCES),
    "max_micro_batch": positive_int, "noise_scale": st.floats(min_value=0.5, max_value=1e6),
    "dataset_size": st.integers(1, 10**6), "drop_last": st.booleans(),
    "caveats": st.lists(st.text(max_size=40), max_size=3),
}
assert set(VALID) == set(FIELDS) - {"workload"}  # every field is exercised (workload loads a model: tested elsewhere)

garbage = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
keys = st.sampled_from(sorted(set(VALID) | (set(_ALIASES) - {"workload"})))


CORE = ("lr", "base_lr", "base_batch", "warmup_steps", "optimizer", "normalization")


@st.composite
def valid_configs(draw):
    """Valid values; the LR/warmup/normalization core is usually present so that the rules interact."""
    names = draw(st.lists(st.sampled_from(sorted(VALID)), unique=True, max_size=len(VALID)))
    if draw(st.integers(0, 3)):
        names = list(dict.fromkeys([*CORE, *names]))
    return {name: draw(VALID[name]) for name in names}


@st.composite
def any_configs(draw):
    cfg = {}
    for key in draw(st.lists(st.one_of(keys, st.text(max_size=10)), max_size=12)):
        value_strategy = VALID.get(key)
        use_valid = value_strategy is not None and draw(st.booleans())
        cfg[key] = draw(value_strategy) if use_valid else draw(garbage)
    return cfg


def _assert_report(findings) -> None:
    for f in findings:
        assert f.code in RULES and f.severity in SEVERITIES
        assert f.message and f.fix and "\n" not in f.reason
        text = (f.message + " " + f.fix).lower()
        assert "stale" not in text  # seeds/README error 4: accumulation is exact
    json.dumps([f.to_dict() for f in findings], allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(valid_configs())
def test_valid_configs_never_raise_and_serialize(cfg):
    before = copy.deepcopy(cfg)
    _assert_report(check_config(cfg))
    assert cfg == before  # the input is not modified


@settings(max_examples=300, deadline=None)
@given(any_configs())
def test_any_mapping_gives_findings_or_a_one_line_error(cfg):
    try:
        findings = check_config(cfg)
    except BatchpilotError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    _assert_report(findings)


def _cli(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["doctor", str(path), "--json"])
    return code, out.getvalue(), err.getvalue()


def _check_cli(code: int, out: str, err: str) -> None:
    if code == 2:  # under --json the error is also a JSON object on stdout
        assert err.count("\n") == 1 and err.startswith("batchpilot doctor: error: ")
        assert json.loads(out) == {"status": "error", "message": err.strip(), "exit_code": 2}
        return
    report = json.loads(out)
    assert code in (0, 1) and report["ok"] is (code == 0)
    assert code == (1 if report["counts"]["error"] else 0)
    assert sum(report["counts"].values()) == len(report["findings"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_configs(), st.sampled_from([".yaml", ".json"]))
def test_cli_prints_valid_json_or_exits_2(cfg, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"cfg{suffix}"
        safe = {k: (None if isinstance(v, float) and not math.isfinite(v) and suffix == ".json" else v) for k, v in cfg.items()}
        path.write_text(json.dumps(safe) if suffix == ".json" else yaml.safe_dump(cfg))
        _check_cli(*_cli(path))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200), st.sampled_from([".yaml", ".json", ".toml"]))
def test_cli_on_arbitrary_text_never_crashes(text, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"cfg{suffix}"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        _check_cli(*_cli(path))


@settings(max_examples=200, deadline=None)
@given(valid_configs())
def test_exit_code_matches_error_findings(cfg):
    findings = check_config(cfg)
    assert exit_code(findings) == (1 if any(f.severity == "error" for f in findings) else 0)
