"""The trial store refuses files that are not its own (untouched), records its schema version, refuses
URL schemes it does not speak (a postgresql:// URL is never a local file), and never crashes on a damaged
row: it is reported and run again."""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from batchpilot.cli import main
from batchpilot.errors import EXIT_USAGE, BatchpilotError
from batchpilot.sweep.runner import SweepConfig, TrialSpec, result_problem, run_sweep, run_trial
from batchpilot.sweep.backends import open_store
from batchpilot.sweep.store import APPLICATION_ID, SCHEMA, SCHEMA_VERSION, TrialStore, store_path


def _files(d) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _pragma(db, name):
    with sqlite3.connect(db) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


def test_another_applications_database_is_refused_untouched(tmp_path):
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.close()
    before = _files(tmp_path)
    with pytest.raises(BatchpilotError, match=r"SQLite database of another application .*tables: users"):
        TrialStore(db)
    assert _files(tmp_path) == before  # not a byte changed, no -wal/-shm left behind


@pytest.mark.parametrize("content", [b"name,batch\nx,32\n" * 50, b"SQLite format 2\x00" + b"\x00" * 200])
def test_a_file_that_is_not_sqlite_is_refused_untouched(tmp_path, content):
    f = tmp_path / "notes.txt"
    f.write_bytes(content)
    with pytest.raises(BatchpilotError, match="not a batchpilot SQLite store"):
        TrialStore(f)
    assert _files(tmp_path) == {"notes.txt": hashlib.sha256(content).hexdigest()}


def test_schema_version_is_recorded_and_checked(tmp_path):
    db = tmp_path / "s.db"
    TrialStore(db).close()
    assert (_pragma(db, "application_id"), _pragma(db, "user_version")) == (APPLICATION_ID, SCHEMA_VERSION)
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")  # an empty file becomes a store
    TrialStore(empty).close()
    assert _pragma(empty, "application_id") == APPLICATION_ID
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(BatchpilotError, match=rf"newer batchpilot \(store schema {SCHEMA_VERSION + 1}"):
        TrialStore(db)


def test_a_store_from_before_the_version_is_adopted(tmp_path):
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(SCHEMA)
        conn.execute("INSERT INTO trials (key, sweep_id, spec, status, attempts, result) "
                     "VALUES ('k', 'sw', '{}', 'done', 1, '{\"x\": 1}')")
    conn.close()
    with TrialStore(db) as store:
        assert store.get("k").result == {"x": 1}
    assert _pragma(db, "application_id") == APPLICATION_ID


@pytest.mark.parametrize("url, scheme", [("mysql://root:hunter2@localhost/x", "mysql"), ("file:///tmp/s.db", "file"),
                                         ("HTTPS://example.com/s.db", "https")])
def test_unsupported_urls_are_refused_without_creating_a_file(url, scheme, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for opener in (TrialStore, open_store):
        with pytest.raises(BatchpilotError, match=rf"store URL scheme {scheme}:// is not supported") as err:
            opener(url)
        assert "hunter2" not in str(err.value)
    assert list(tmp_path.rglob("*")) == []


def test_a_postgresql_url_is_never_a_local_file(tmp_path, monkeypatch):
    """The SQLite store refuses a server URL (it once made a file named after it); open_store sends it to the
    PostgreSQL backend, whose connection error names the server without the password."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BatchpilotError, match=r"postgresql:// is a PostgreSQL store, not a SQLite file"):
        TrialStore("postgresql://bob:hunter2@db.example/sweeps")
    pytest.importorskip("psycopg")
    with pytest.raises(BatchpilotError, match=r"cannot connect to the PostgreSQL server") as err:
        open_store("postgresql://bob:hunter2@127.0.0.1:1/sweeps", connect_timeout_s=2)
    assert "hunter2" not in str(err.value) and "bob:***@127.0.0.1:1/sweeps" in str(err.value)
    assert list(tmp_path.rglob("*")) == []


def test_sqlite_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert store_path("sqlite:///runs/s.db") == store_path("runs/s.db")
    assert str(store_path(f"sqlite:///{tmp_path}/a.db")) == f"{tmp_path}/a.db"  # four slashes: absolute
    TrialStore("sqlite:///runs/s.db").close()
    assert (tmp_path / "runs" / "s.db").is_file()
    for bad in ("sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite://host/s.db"):
        with pytest.raises(BatchpilotError, match="must be sqlite:///path"):
            TrialStore(bad)


def _damage(db, key, **columns):
    with sqlite3.connect(db) as conn:
        for col, value in columns.items():
            conn.execute(f"UPDATE trials SET {col} = ? WHERE key = ?", (value, key))
    conn.close()


def test_damaged_rows_are_skipped_and_reported_never_a_crash(tmp_path):
    db = tmp_path / "s.db"
    with TrialStore(db) as store:
        for k in ("a", "b", "c", "d"):
            assert store.claim(k, "sw", {"k": k}) == "claimed"
            store.finish(k, {"x": k})
    _damage(db, "a", result='{"x": tru')  # cut off
    _damage(db, "b", spec="[1, 2]")
    _damage(db, "c", result=None)  # done without a result
    with TrialStore(db) as store:
        assert [r.key for r in store.rows()] == ["d"]
        assert store.get("a") is None
        assert set(store.invalid) == {"a", "b", "c"}
        assert "result is not JSON" in store.invalid["a"] and "spec is not a JSON object" in store.invalid["b"]
        assert "status done without a result" in store.invalid["c"]
        assert store.claim("a", "sw", {"k": "a"}) == "claimed"  # a damaged done trial runs again
        assert "the trial runs again" in store.invalid["a"]
        assert store.claim("d", "sw", {"k": "d"}, check=lambda r: None) == "done"
        assert store.claim("d", "sw", {"k": "d"}, check=lambda r: "wrong x") == "claimed"
        row = store.get("d")
        assert row.status == "running" and row.attempts == 2 and row.error == "re-run: wrong x"


def test_a_running_row_with_a_damaged_heartbeat_is_reclaimed(tmp_path):
    db = tmp_path / "s.db"
    with TrialStore(db, owner="otherhost:1:x") as other:
        other.claim("k", "sw", {})
    _damage(db, "k", heartbeat="yesterday")
    with TrialStore(db) as store:
        assert store.claim("k", "sw", {}) == "claimed"


def _result(trial: TrialSpec) -> dict:
    """A complete, plausible trial result (the fields :func:`run_trial` writes)."""
    return {**asdict(trial), "lr": trial.lr or 0.1, "lr_rule": "linear", "warmup_steps": 0, "micro_batch": trial.batch,
            "status": "completed", "diverged": False, "steps": 10, "epochs": 1.0, "metric_name": "val_acc",
            "higher_is_better": True, "target": "val_acc>=0.5", "steps_to_target": 5, "examples_to_target": 5 * trial.batch,
            "time_to_target_s": 0.5, "train_wall_s": 1.0, "median_step_s": 0.1, "median_time_to_target_s": 0.5,
            "threads": 1, "samples_per_s": 100.0, "final_train_loss": 0.5, "val_metric": 0.6, "val_loss": 0.7,
            "train_metric": 0.65, "train_loss": 0.6, "generalization_gap": 0.05, "sharpness": None, "sharpness_s": None,
            "trial_wall_s": 1.0}


def test_an_edited_result_is_reported_and_its_trial_runs_again(tmp_path):
    cfg = SweepConfig(workload="w", batches=(32, 64, 128))
    db = tmp_path / "s.db"

    def execute(calls):
        def run(workload, config, trial, on_step):
            calls.append(trial.batch)
            return _result(trial)
        return run

    first: list[int] = []
    with TrialStore(db) as store:
        out = run_sweep(cfg, store, workload=lambda: SimpleNamespace(num_train=10**6), execute=execute(first), check_result=result_problem)
    assert first == [32, 64, 128] and len(out.trials) == 3
    key64, key128 = cfg.trial_key(TrialSpec(64)), cfg.trial_key(TrialSpec(128))
    with sqlite3.connect(db) as conn:
        text = conn.execute("SELECT result FROM trials WHERE key = ?", (key64,)).fetchone()[0]
        conn.execute("UPDATE trials SET result = ? WHERE key = ?", (text.replace('"batch": 64', '"batch": "64"'), key64))
        conn.execute("UPDATE trials SET result = 'garbage' WHERE key = ?", (key128,))
    conn.close()
    again: list[int] = []
    events: list[tuple[str, dict]] = []
    with TrialStore(db) as store:
        out2 = run_sweep(cfg, store, workload=lambda: SimpleNamespace(num_train=10**6), execute=execute(again), check_result=result_problem,
                         on_event=lambda kind, info: events.append((kind, info)))
    assert again == [64, 128] and out2.ran == 2 and out2.skipped == 1
    reasons = {info["trial"].batch: info["reason"] for kind, info in events if kind == "invalid"}
    assert reasons.keys() == {64, 128}
    assert "batch = '64', expected int" in reasons[64] and "result is not JSON" in reasons[128]
    assert sorted(t["batch"] for t in out2.trials) == [32, 64, 128]


def test_result_problem_accepts_what_run_trial_writes_and_names_what_is_wrong(mlp_workload):
    cfg = SweepConfig(workload="mnist1d-mlp", batches=(64,), max_epochs=0.3, evals_per_epoch=2, sharpness_iters=2,
                      sharpness_probes=1, sharpness_samples=32)
    trial = TrialSpec(64)
    result = run_trial(mlp_workload, cfg, trial)
    assert result_problem(result, trial) is None
    assert "lacks 'steps'" in result_problem({k: v for k, v in result.items() if k != "steps"}, trial)
    assert "another trial (seed 1" in result_problem({**result, "seed": 1}, trial)
    assert "val_metric = nan" in result_problem({**result, "val_metric": float("nan")}, trial)
    assert "status 'exploded'" in result_problem({**result, "status": "exploded"}, trial)


def test_cli_refuses_bad_stores_in_one_line(tmp_path, capsys):
    text = tmp_path / "results.csv"
    text.write_text("batch,steps\n32,100\n")
    base = ["sweep", "--workload", "mnist1d-mlp", "--workload-opt", "num_train=600", "--batches", "32"]
    for store, message in ((str(text), "not a batchpilot SQLite store"),
                           ("mysql://u:pw@h/db", "store URL scheme mysql:// is not supported")):
        capsys.readouterr()
        assert main([*base, "--store", store]) == EXIT_USAGE
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("batchpilot sweep: error:")]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert text.read_text() == "batch,steps\n32,100\n"


def test_a_store_where_no_directory_can_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BatchpilotError, match="cannot create its directory"):
        TrialStore(blocker / "sub" / "s.db")
