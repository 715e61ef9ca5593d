"""A config is data: the doctor imports no workload it names and stays bounded on hostile files."""

from __future__ import annotations

import json
import time

import pytest

from batchpilot.cli import main
from batchpilot.doctor import check_config, load_config
from batchpilot.errors import BatchpilotError


def _doctor(capsys, *argv):
    code = main(["doctor", *map(str, argv), "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


@pytest.mark.parametrize("spec", ["evil_wl.py:make_workload", "evil_pkg_xyz.module:make_workload"])
def test_a_workload_named_in_a_config_is_never_imported(tmp_path, monkeypatch, capsys, spec):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil_wl.py").write_text("import pathlib\npathlib.Path('pwned').write_text('x')\n"
                                         "def make_workload():\n    raise SystemExit(9)\n")
    (tmp_path / "evil_pkg_xyz").mkdir()
    (tmp_path / "evil_pkg_xyz" / "__init__.py").write_text("import pathlib\npathlib.Path('pwned').write_text('x')\n")
    (tmp_path / "evil_pkg_xyz" / "module.py").write_text("def make_workload():\n    raise SystemExit(9)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"workload: {spec}\nglobal_batch: 256\nlr: 0.1\n")
    code, report, _ = _doctor(capsys, cfg)
    assert code in (0, 1) and not (tmp_path / "pwned").exists()
    bp002 = next(f for f in report["findings"] if f["code"] == "BP002")
    assert "was not imported" in bp002["message"] and spec in bp002["message"]


def test_a_builtin_workload_still_fills_the_base_point(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("workload: mnist1d-mlp\nglobal_batch: 256\nlr: 0.05\nwarmup_steps: 10\n")
    code, report, _ = _doctor(capsys, cfg)
    codes = {f["code"] for f in report["findings"]}
    assert code == 1 and "BP201" in codes  # base_lr 0.05 at 32 came from the built-in: 8x batch, same LR


def test_many_unknown_keys_give_a_bounded_report(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({f"key_{i}_{'k' * 200}": i for i in range(5000)} | {"global_batch": 64}))
    t0 = time.perf_counter()
    code, report, _ = _doctor(capsys, cfg)
    assert time.perf_counter() - t0 < 20
    bp001 = [f for f in report["findings"] if f["code"] == "BP001"]
    assert len(bp001) == 21 and "4980 more unknown fields" in bp001[-1]["message"]
    assert all(len(f["message"]) < 300 for f in bp001)


def test_alias_bomb_is_refused_fast(tmp_path):
    text = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(text + "normalization: *i\n")
    t0 = time.perf_counter()
    with pytest.raises(BatchpilotError, match="once aliases are expanded"):
        load_config(cfg)
    assert time.perf_counter() - t0 < 5
    many = tmp_path / "many.yaml"
    many.write_text("a: &a 1\nb: [" + ", ".join(["*a"] * 2000) + "]\n")
    with pytest.raises(BatchpilotError, match="more than 1000 YAML aliases"):
        load_config(many)


@pytest.mark.parametrize("data, needle", [
    ({"lr": "y" * 1_000_000}, "lr must be a finite number > 0"),
    ({"global_batch": 10**4000}, "digits"),
    ({"lr": 1e308 * 10}, "got inf"),
    ({"normalization": [["x"] * 1000] * 1000}, "normalization must be"),
    ({"optimizer": ""}, "optimizer must be a non-empty string"),
])
def test_hostile_values_give_short_one_line_errors(data, needle):
    with pytest.raises(BatchpilotError) as exc:
        check_config(data)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg and len(msg) < 400
