"""Bad input to every verb: exit 2, one line naming the bad value, no traceback, nothing written.

Every case runs in-process (``batchpilot.cli.main``) in a scratch directory holding a few prepared
files (plans with one bad field each, a workload file that does not import, a file where a directory
is expected, a read-only directory, hostile doctor configs). The directory is snapshotted before and
after: a bad command must fail before it creates, changes or deletes anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from batchpilot.cli import main

SMALL = ["--workload", "mnist1d-mlp", "--workload-opt", "num_train=400", "--workload-opt", "num_val=100"]

USER_WORKLOAD = '''
import torch
from torch.utils.data import TensorDataset
from batchpilot import Workload

def make_workload():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return Workload(name="toy", make_model=lambda: torch.nn.Linear(8, 2), train_data=TensorDataset(x[:192], y[:192]),
                    val_data=TensorDataset(x[192:], y[192:]),
                    loss_sum=lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="sum"),
                    metric_sum=lambda o, t: (o.argmax(-1) == t).sum(),
                    make_optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr), base_batch=16, base_lr=0.05)
'''


def plan_dict(**changes) -> dict:
    plan = {"schema_version": 1, "workload": "mnist1d-mlp",
            "workload_spec": {"name": "mnist1d-mlp", "options": {"num_train": 400, "num_val": 100}, "kind": "builtin",
                              "file": None},
            "micro_batch_per_rank": 16, "accumulation_steps": 2, "world_size": 1, "global_batch": 32, "lr": 0.05,
            "lr_rule": "linear", "warmup_steps": 0, "threads": 1, "caveats": [], "schedule": "constant"}
    plan.update(changes)
    return plan


PLANS = {
    "ok": plan_dict(),
    "lr_abc": plan_dict(lr="abc"),
    "lr_negative": plan_dict(lr=-0.5),
    "threads_neg": plan_dict(threads=-3),
    "threads_list": plan_dict(threads=[2, 4]),
    "workload_42": plan_dict(workload=42),
    "product": plan_dict(global_batch=48),
    "micro_zero": plan_dict(micro_batch_per_rank=0, global_batch=0),
    "missing_lr": {k: v for k, v in plan_dict().items() if k != "lr"},
    "future": plan_dict(schema_version=99),
    "rule": plan_dict(lr_rule="cubic"),
    "user_code": plan_dict(workload="toy", workload_spec={"name": "my_wl.py:make_workload", "options": {},
                                                          "kind": "path", "file": None}),
    "hf": plan_dict(workload="hf:gpt2", workload_spec={"name": "hf:gpt2", "options": {}, "kind": "hf", "file": None}),
}

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "lr: *i\n"


def _unwritable(tmp: Path) -> str:
    """A directory this process cannot write (chmod 555; root ignores that, so a sysfs path then)."""
    if os.geteuid() == 0:
        return "/sys/batchpilot-test-not-writable/out"
    return str(tmp / "readonly" / "out")


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """cwd = a scratch directory with the prepared files; yields (dir, unwritable path)."""
    (tmp_path / "afile").write_text("I am a file\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir.yaml").mkdir()
    (tmp_path / "my_wl.py").write_text(USER_WORKLOAD)
    (tmp_path / "broken_wl.py").write_text("import no_such_module_anywhere\n")
    (tmp_path / "typo_wl.py").write_text("def make_workload(:\n")
    plans = tmp_path / "plans"
    plans.mkdir()
    for name, data in PLANS.items():
        (plans / f"{name}.json").write_text(json.dumps(data))
    (plans / "not_json.json").write_text("{\"lr\": 0.1,")
    (plans / "array.json").write_text("[1, 2, 3]")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "bomb.yaml").write_text(BOMB)
    (cfg / "recursive.yaml").write_text("a: &a [1, *a]\n")
    (cfg / "huge_int.yaml").write_text("global_batch: " + "9" * 4000 + "\n")
    (cfg / "huge_str.yaml").write_text("lr: " + "x" * 200_000 + "\n")
    (cfg / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (cfg / "lr_abc.yaml").write_text("global_batch: 256\nlr: abc\n")
    (cfg / "batch0.yaml").write_text("global_batch: 0\n")
    (cfg / "cfg.txt").write_text("global_batch: 64\n")
    (cfg / "typo.yaml").write_text("workload: mnist1d-mpl\n")
    (cfg / "plan_threads.json").write_text(json.dumps(plan_dict(threads=-3)))
    (cfg / "big.yaml").write_text("x: " + "y" * (3 * 2**20) + "\n")
    (cfg / "cal_int.json").write_text(json.dumps({"calibration": 5}))
    (cfg / "cal_neg.json").write_text(json.dumps({"device": "H100", "factor": -1, "band": {
        "low_factor": 0.9, "high_factor": 1.1, "relative": 0.1, "source": "x"}}))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "blocked" / "checkpoint.pt").mkdir(parents=True)
    (tmp_path / "badckpt").mkdir()
    (tmp_path / "badckpt" / "checkpoint.pt").write_bytes(bytes(range(256)) * 4)
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    monkeypatch.chdir(tmp_path)
    yield tmp_path, _unwritable(tmp_path)
    ro.chmod(0o755)


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


# (argv, text the one-line message must contain); "{ro}" is replaced by an unwritable directory
CASES = [
    # --- train
    (["train", "--batch", "0"], "got 0"),
    (["train", "--batch", "-4"], "got -4"),
    (["train", *SMALL, "--lr", "-1"], "lr must be a finite number >= 0, got -1.0"),
    (["train", *SMALL, "--lr", "nan"], "got nan"),
    (["train", *SMALL, "--batch", "64", "--micro-batch", "24"], "micro-batch 24 does not divide"),
    (["train", *SMALL, "--steps", "0"], "steps must be a positive integer, got 0"),
    (["train", *SMALL, "--epochs", "-1"], "epochs must be > 0, got -1.0"),
    (["train", *SMALL, "--warmup-steps", "-3"], "got -3"),
    (["train", *SMALL, "--grad-clip", "0"], "grad clip must be > 0, got 0.0"),
    (["train", *SMALL, "--ema", "1.5"], "got 1.5"),
    (["train", *SMALL, "--target", "accuracy"], "'accuracy'"),
    (["train", "--dtype", "fp8"], "'fp8'"),
    (["train", "--dtype", "fp16"], "float16 training needs loss scaling"),
    (["train", "--steps", "abc"], "'abc'"),
    (["train", "--workload", "nope"], "unknown workload 'nope'"),
    (["train", "--workload", "missing_wl.py:make_workload"], "'missing_wl.py' does not exist"),
    (["train", "--workload", "broken_wl.py:make_workload"], "'broken_wl.py' failed to import"),
    (["train", "--workload", "typo_wl.py:make_workload"], "'typo_wl.py' failed to import"),
    (["train", "--workload", "my_wl.py:no_such_fn"], "'no_such_fn'"),
    (["train", "--workload", "no_such_pkg_xyz.mod:make"], "'no_such_pkg_xyz.mod'"),
    (["train", "--workload", "hf:gpt2"], "batchpilot memory --workload hf:gpt2"),
    (["train", *SMALL, "--batch", "5000"], "batch 5000 is larger than the training set"),
    (["train", "--workload", "my_wl.py:make_workload", "--batch", "1024"], "batch 1024 is larger than the training set"),
    (["train", *SMALL, "--workload-opt", "bogus=1"], "argument 'bogus'"),
    (["train", "--workload-opt", "noequals"], "'noequals'"),
    (["train", *SMALL, "--out", "afile"], "--out 'afile' exists and is not a directory"),
    (["train", *SMALL, "--out", "afile/run"], "'afile/run'"),
    (["train", *SMALL, "--out", "{ro}"], "not writable"),
    (["train", *SMALL, "--resume"], "--resume needs --out"),
    (["train", *SMALL, "--checkpoint-every", "5"], "--checkpoint-every 5 needs --out"),
    (["train", *SMALL, "--init-from", "nowhere.pt"], "'nowhere.pt' does not exist"),
    (["train", *SMALL, "--finetune"], "--finetune needs --init-from"),
    (["train", *SMALL, "--batch", "32", "--adaptive", "--max-batch", "8"], "max batch 8 is below"),
    (["train", *SMALL, "--batch", "32", "--adaptive", "--min-batch", "64"], "min batch 64 is above"),
    (["train", *SMALL, "--batch-schedule", "zigzag:end=9"], "zigzag"),
    (["train", *SMALL, "--nproc", "0"], "--nproc must be >= 1, got 0"),
    (["train", "--plan", "plans/missing.json"], "'plans/missing.json' does not exist"),
    (["train", "--plan", "plans"], "'plans' is not a file"),
    (["train", "--plan", "plans/lr_abc.json"], "lr must be a finite number > 0, got 'abc'"),
    (["train", "--plan", "plans/lr_negative.json"], "got -0.5"),
    (["train", "--plan", "plans/threads_neg.json"], "threads must be an integer from 1 to 1e15, got -3"),
    (["train", "--plan", "plans/threads_list.json"], "got [2, 4]"),
    (["train", "--plan", "plans/workload_42.json"], "workload must be a non-empty string, got 42"),
    (["train", "--plan", "plans/product.json"], "global_batch 48 != micro_batch_per_rank 16"),
    (["train", "--plan", "plans/micro_zero.json"], "micro_batch_per_rank must be an integer from 1"),
    (["train", "--plan", "plans/missing_lr.json"], "lacks lr"),
    (["train", "--plan", "plans/future.json"], "schema_version 99"),
    (["train", "--plan", "plans/rule.json"], "'cubic'"),
    (["train", "--plan", "plans/not_json.json"], "not readable JSON"),
    (["train", "--plan", "plans/array.json"], "must hold a JSON object"),
    (["train", "--plan", "plans/user_code.json"], "add --workload my_wl.py:make_workload"),
    (["train", "--plan", "plans/user_code.json", "--workload", "mnist1d-mlp"], "not 'mnist1d-mlp'"),
    (["train", "--plan", "plans/ok.json", "--workload", "charlm"], "not 'charlm'"),
    (["train", "--plan", "plans/hf.json"], "batchpilot memory --workload hf:gpt2"),
    (["train", "--plan", "plans/ok.json", "--nproc", "3"], "does not divide over 3 ranks"),
    # --- memory
    (["memory", "--device", "RTX 9999"], "unknown device 'RTX 9999'"),
    (["memory", "--memory", "12XB"], "'12XB'"),
    (["memory", "--batch-sizes", "0,4"], "'0,4'"),
    (["memory", "--batch-sizes", "a,b"], "'a,b'"),
    (["memory", "--global-batch", "0"], "--global-batch must be a positive integer, got 0"),
    (["memory", "--seq-len", "-1"], "--seq-len must be a positive integer, got -1"),
    (["memory", "--dtype", "int8"], "'int8'"),
    (["memory", "--workload", "nope"], "unknown workload 'nope'"),
    (["memory", "--workload", "broken_wl.py:make_workload"], "failed to import"),
    (["memory", *SMALL, "--out", "afile"], "'afile' exists and is not a directory"),
    (["memory", *SMALL, "--out", "afile/mem"], "'afile/mem'"),
    (["memory", *SMALL, "--out", "{ro}"], "not writable"),
    # --- plan
    (["plan", "--noise-budget", "0"], "--noise-budget must be a finite number of seconds > 0, got 0.0"),
    (["plan", "--throughput-budget", "-5"], "got -5.0"),
    (["plan", "--out", "afile"], "'afile' exists and is not a directory"),
    (["plan", "--out", "afile/p"], "'afile/p'"),
    (["plan", "--out", "{ro}"], "not writable"),
    (["plan", "--device", "RTX 9999"], "unknown device 'RTX 9999'"),
    (["plan", "--memory", "lots"], "'lots'"),
    (["plan", "--workload", "hf:gpt2"], "batchpilot memory --workload hf:gpt2"),
    (["plan", "--workload", "nope"], "unknown workload 'nope'"),
    (["plan", "--workload", "broken_wl.py:make_workload"], "failed to import"),
    (["plan", "--world-size", "0"], "got '0'"),
    (["plan", "--threads", "0"], "--threads"),
    (["plan", "--allreduce-gbps", "-1"], "got -1.0"),
    # --- sweep
    (["sweep", *SMALL, "--batches", "32,x"], "'32,x'"),
    (["sweep", *SMALL, "--batches", "0,32"], "got '0,32'"),
    (["sweep", *SMALL, "--batches", "32,5000"], "batch 5000 is larger than the training set"),
    (["sweep", *SMALL, "--batches", "32", "--lr-multipliers", "1,-2"], "'1,-2'"),
    (["sweep", *SMALL, "--batches", "32", "--seeds", "0"], "seeds must be a positive integer, got 0"),
    (["sweep", *SMALL, "--batches", "32", "--target", "acc"], "'acc'"),
    (["sweep", *SMALL, "--batches", "32", "--gap-threshold", "-1"], "got -1.0"),
    (["sweep", *SMALL, "--batches", "32", "--max-epochs", "0"], "max epochs must be > 0, got 0.0"),
    (["sweep", *SMALL, "--batches", "32", "--store", "afile/s.db"], "'afile/s.db'"),
    (["sweep", *SMALL, "--batches", "32", "--store", "adir"], "--store 'adir' is a directory"),
    (["sweep", *SMALL, "--batches", "32", "--store", "{ro}/s.db"], "not writable"),
    (["sweep", *SMALL, "--batches", "32", "--out", "afile"], "'afile' exists and is not a directory"),
    (["sweep", "--batches", "32", "--workload", "hf:gpt2"], "batchpilot memory --workload hf:gpt2"),
    (["sweep", "--batches", "32", "--plan", "plans/lr_abc.json"], "got 'abc'"),
    (["sweep", "--batches", "32", "--plan", "plans/user_code.json"], "add --workload my_wl.py:make_workload"),
    (["sweep", "--batches", "32", "--plan", "plans/ok.json", "--workload", "charlm"], "not 'charlm'"),
    (["sweep", *SMALL, "--batches", "32", "--plan", "plans/missing.json"], "does not exist"),
    # --- doctor
    (["doctor", "cfg/missing.yaml"], "'cfg/missing.yaml'"),
    (["doctor", "cfg/cfg.txt"], "must end in .yaml"),
    (["doctor", "cfg/bomb.yaml"], "once aliases are expanded"),
    (["doctor", "cfg/recursive.yaml"], "contains itself"),
    (["doctor", "cfg/huge_int.yaml"], "digits"),
    (["doctor", "cfg/huge_str.yaml"], "lr must be a finite number > 0, got 'xxx"),
    (["doctor", "cfg/deep.json"], "deep.json"),
    (["doctor", "cfg/big.yaml"], "larger than 2 MiB"),
    (["doctor", "cfg/lr_abc.yaml"], "got 'abc'"),
    (["doctor", "cfg/batch0.yaml"], "got 0"),
    (["doctor", "cfg/typo.yaml"], "unknown workload 'mnist1d-mpl'"),
    (["doctor", "cfg/plan_threads.json"], "threads must be an integer from 1 to 1e15, got -3"),
    (["doctor", "cfg/lr_abc.yaml", "--ignore", "BP999"], "BP999"),
    (["doctor", "cfg/lr_abc.yaml", "--section", "training.opt"], "'training.opt'"),
    (["doctor", "adir.yaml"], "'adir.yaml' is a directory"),
    (["doctor", ""], "config must name a .yaml, .yml, .json or .toml file, got ''"),
    # --- train: flags that only apply with others are refused, not silently ignored
    (["train", *SMALL, "--batch", "32", "--micro-batch", "16", "--noise-scale", "--noise-fused"],
     "--noise-fused needs the per-example monitor (one process, no accumulation, a fixed batch); this run has "
     "accumulation (2 micro-batches of 16)"),
    (["train", *SMALL, "--batch", "32", "--adaptive", "--noise-scale", "--noise-fused"], "a batch that changes"),
    (["train", *SMALL, "--nproc", "2", "--noise-scale", "--noise-fused"], "--nproc 2 measures the noise scale"),
    (["train", *SMALL, "--adaptive-throughput", "probe"], "--adaptive-throughput applies to --adaptive only"),
    (["train", *SMALL, "--adaptive-noise-window", "all"], "--adaptive-noise-window applies to --adaptive only"),
    (["train", *SMALL, "--adaptive-estimator", "per-example"], "--adaptive-estimator applies to --adaptive only"),
    (["train", *SMALL, "--max-restarts", "2"], "--max-restarts 2 applies with --nproc N only"),
    (["train", *SMALL, "--max-restarts", "-1"], "--max-restarts must be >= 0, got -1"),
    (["train", *SMALL, "--log", "csv", "--log-dir", "afile"], "--log-dir 'afile' exists and is not a directory"),
    (["train", *SMALL, "--log", "csv", "--log-dir", ""], "--log-dir must name a directory, got ''"),
    (["train", *SMALL, "--log", ""], "--log must be one of tensorboard, csv, jsonl (several allowed), got ''"),
    (["sweep", *SMALL, "--batches", "32", "--log", "csv", "--log-dir", "afile"], "--log-dir 'afile' exists"),
    (["train", *SMALL, "--out", "blocked"], "--out 'blocked' holds a directory named 'checkpoint.pt'"),
    (["train", *SMALL, "--out", "blocked", "--resume"], "--out 'blocked' holds a directory named 'checkpoint.pt'"),
    (["train", *SMALL, "--out", "badckpt", "--resume"], "(UnpicklingError: it holds objects other than tensors"),
    # --- empty paths and names are errors, not the default
    (["train", "--plan", ""], "--plan must name a file, got ''"),
    (["train", "--init-from", ""], "--init-from must name a file, got ''"),
    (["train", "--workload", ""], "--workload must name a workload"),
    (["train", "--plan", "plans/ok.json", "--workload", " "], "--workload must name a workload"),
    (["sweep", "--batches", "32", "--plan", ""], "--plan must name a plan.json file, got ''"),
    (["sweep", "--batches", "32", "--workload", ""], "--workload must name a workload"),
    (["memory", "--workload", ""], "--workload must name a workload"),
    # --- --init-from files that are not tensors: short, and never unpickled
    (["train", *SMALL, "--init-from", "afile"], "'afile' cannot be loaded as tensors only (UnpicklingError); expected"),
    (["train", *SMALL, "--init-from", "empty.pt"], "'empty.pt' are an empty file (0 bytes)"),
    # --- plan --calibration, sizes and budgets (fail before any measurement)
    (["plan", "--calibration", ""], "--calibration must name a file, got ''"),
    (["plan", "--calibration", "cfg/missing.json"], "'cfg/missing.json' does not exist"),
    (["plan", "--calibration", "adir"], "'adir' is not a file"),
    (["plan", "--calibration", "cfg/deep.json"], "nested too deeply"),
    (["plan", "--calibration", "cfg/cal_int.json"], "holds no fp32 calibration"),
    (["plan", "--calibration", "plans/array.json"], "holds no fp32 calibration"),
    (["plan", "--calibration", "cfg/cal_neg.json"], "'cfg/cal_neg.json': a calibration factor must be a positive "
                                                    "finite number, got -1.0"),
    (["plan", "--throughput-budget", "inf"], "--throughput-budget must be a finite number of seconds > 0, got inf"),
    # --- sizes: memory and world sizes
    (["plan", "--memory", "1e400GB"], "memory size must be a finite number of bytes, got '1e400GB'"),
    (["memory", "--memory", "1e400GB"], "got '1e400GB'"),
    (["plan", "--device", ""], "device must be cpu, cuda, a GPU name (e.g. H100) or a size (e.g. 24GiB), got ''"),
    (["memory", "--device", " "], "got ' '"),
    (["plan", "--world-size", "99999999999999999999"], "world sizes must be at most 1,000,000 ranks"),
    (["memory", "--world-size", ""], "world sizes must be integers >= 1, got ''"),
    (["memory", "--batch-sizes", "99999999999999999999"], "--batch-sizes must be at most 1,000,000,000,000"),
    (["memory", "--global-batch", "99999999999999999999"], "--global-batch must be at most 1,000,000,000,000"),
    # --- workloads
    (["workloads", "--bogus"], "--bogus"),
]


def _id(case) -> str:
    argv, _ = case
    return "-".join(a.replace("/", "_")[:24] for a in argv if a not in SMALL or a == "--workload")[:70]


@pytest.mark.parametrize("argv, needle", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(scratch, capsys, argv, needle):
    root, ro = scratch
    argv = [a.replace("{ro}", ro) for a in argv]
    needle = needle.replace("{ro}", ro)
    before = snapshot(root)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert len(lines[0]) < 600, len(lines[0])  # huge values are shortened
    assert snapshot(root) == before


JSON_CASES = [
    ["train", "--batch", "0", "--json"],
    ["train", "--dtype", "fp8", "--json"],  # argparse's error, too
    ["memory", "--device", "RTX 9999", "--json"],
    ["plan", "--out", "afile", "--json"],
    ["sweep", *SMALL, "--batches", "32,x", "--json"],
    ["doctor", "cfg/lr_abc.yaml", "--json"],
    ["workloads", "--json", "--bogus"],
]


@pytest.mark.parametrize("argv", JSON_CASES, ids=[" ".join(a[:3]) for a in JSON_CASES])
def test_json_errors_are_a_json_object_on_stdout(scratch, capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2
    data = json.loads(out)
    assert data == {"status": "error", "message": err.strip(), "exit_code": 2}
    assert len(err.strip().splitlines()) == 1


class _Payload:
    """Unpickling this runs code: a file that batchpilot must refuse rather than load."""

    def __reduce__(self):
        return (Path.touch, (Path("PWNED"),))


@pytest.mark.parametrize("argv", [["train", *SMALL, "--init-from", "evil.pt"],
                                  ["train", *SMALL, "--out", "run", "--resume"]], ids=["init-from", "resume"])
def test_user_torch_files_are_never_unpickled(scratch, capsys, argv):
    """``--init-from`` and ``--resume`` load with ``weights_only=True``: a pickle that runs code is refused."""
    import torch

    root, _ = scratch
    torch.save({"model": _Payload()}, root / "evil.pt")
    (root / "run").mkdir()
    torch.save({"config": _Payload(), "model": {}}, root / "run" / "checkpoint.pt")
    before = snapshot(root)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and len(err) < 600, err
    assert not (root / "PWNED").exists()
    assert snapshot(root) == before


@pytest.mark.parametrize("exc, needle", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 51200000000 bytes. Error code 12 (Cannot allocate memory)"), "an allocation of 47.68 GiB"),
    (MemoryError(), "out of memory on this machine: the inputs ask"),
], ids=["torch-cpu-allocator", "MemoryError"])
def test_an_allocation_too_large_is_one_line(scratch, capsys, monkeypatch, exc, needle):
    """e.g. ``memory --workload hf:gpt2 --seq-len 99999999`` (random tokens of 64 x 1e8): exit 2, no traceback."""
    import batchpilot.cli.memory_cmd as memory_cmd

    def run(args):
        raise exc

    monkeypatch.setattr(memory_cmd, "run", run)
    assert main(["memory", "--json"]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert json.loads(out)["exit_code"] == 2


def test_other_runtime_errors_still_raise(scratch, monkeypatch):
    """Only allocation failures are turned into a line: a bug keeps its traceback."""
    import batchpilot.cli.memory_cmd as memory_cmd

    def run(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(memory_cmd, "run", run)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["memory"])


def test_negative_hf_size_is_named(scratch, capsys):
    """``--workload-opt n_layer=-1`` was 'fake-tensor trace failed (ValueError: __len__() should return >= 0)'."""
    pytest.importorskip("transformers")
    assert main(["memory", "--workload", "hf:gpt2", "--workload-opt", "n_layer=-1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "batchpilot memory: error: hf:gpt2: n_layer is a size: it must be >= 0, got -1"


def test_ctrl_c_while_the_parser_imports_is_one_line(monkeypatch, capsys):
    """Ctrl-C before a verb runs (building the parser imports torch and every verb): exit 130, no traceback."""
    import batchpilot.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["train"]) == 130
    assert capsys.readouterr().err == "batchpilot: interrupted\n"


def test_an_out_dir_holding_a_run_is_not_replaced_unasked(tmp_path, capsys):
    """``train --out DIR`` where DIR holds an earlier run: refused (exit 2, one line, the files untouched)
    unless --resume continues it or --overwrite replaces it (and then no stale file of the old run stays)."""
    out = tmp_path / "run"
    base = ["train", "--workload", "mnist1d-mlp", "--steps", "2", "--threads", "1", "--out", str(out)]
    assert main(base + ["--checkpoint-every", "1"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"checkpoint.pt", "metrics.jsonl", "summary.json"}
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(base + ["--overwrite", "--seed", "1"]) == 0  # a new run in its place
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) == set(before) and all(after[n] != before[n] for n in ("checkpoint.pt", "summary.json"))
    assert main(base + ["--seed", "1", "--steps", "3", "--resume"]) == 0
