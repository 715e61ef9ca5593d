"""The sweep: train at several batch sizes and measure what each one really costs.

After Shallue et al. 2019 ("Measuring the Effects of Data Parallelism on Neural Network
Training"): every trial trains the workload with the reference :class:`~batchpilot.train.Trainer`
at one global batch, with the LR scaled from the workload's base point (times an optional
multiplier, so each batch can keep its best LR) and a linear warmup, and records the
steps, examples and training time to the target, the final train and validation metric,
the generalization gap, and the sharpness of the trained weights. A diverged trial is a
result like any other.

Trials are identified by a hash of everything that defines them, persisted one by one in
a :class:`~batchpilot.sweep.store.TrialStore` as they finish, and claimed atomically, so a killed
sweep resumes where it stopped and two processes on one store share the grid without
running any trial twice. A stored result is checked before it is trusted (:func:`result_problem`): one
that was damaged or edited by hand is reported (the ``invalid`` event) and its trial runs again.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch

from batchpilot.errors import BatchpilotError, require_non_negative, require_positive_int
from batchpilot.scaling.lr_rules import LR_RULES
from batchpilot.sweep.store import Heartbeat, TrialStore
from batchpilot.workloads import Target, Workload

STORE_VERSION = 2
"""Bumped when what a trial measures changes, so old rows are not mistaken for new ones."""
Event = Callable[[str, dict], None]


@dataclass(frozen=True)
class TrialSpec:
    """One trial of the grid.

    Attributes:
        batch: global batch.
        lr_multiplier: multiplies the scaled LR (1 = the rule's LR).
        seed: seeds init, dropout and data order.
        lr: an explicit peak LR (a plan's), overriding the rule and multiplier.
        warmup_steps: explicit warmup (a plan's); ``None`` uses the sweep's warmup rule.
        micro_batch: micro-batch (accumulation = batch / micro_batch); ``None``: none.
        tag: ``grid`` for the sweep's own trials, ``plan`` for the plan's configuration.
    """

    batch: int
    lr_multiplier: float = 1.0
    seed: int = 0
    lr: float | None = None
    warmup_steps: int | None = None
    micro_batch: int | None = None
    tag: str = "grid"


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep and how each trial trains.

    Attributes:
        workload: workload name or loader path.
        workload_options: options for the workload factory.
        batches: global batches of the grid.
        lr_rule: LR scaling rule; ``None`` picks by optimizer.
        lr_multipliers: LR multipliers tried at every batch (each batch keeps its best).
        seeds: seeds per (batch, multiplier): 0 .. seeds-1.
        target: e.g. ``val_acc>=0.9``; ``None`` uses the workload's.
        max_epochs: training length of every trial, in epochs.
        warmup_epochs: linear warmup length in epochs, applied when the peak LR exceeds the base LR.
        evals_per_epoch: validation evaluations per epoch (the resolution of steps-to-target).
        stop_at_target: end each trial at the target (faster; final metrics are then at the target).
        sharpness: measure the top Hessian eigenvalue and trace of each trained model.
        sharpness_mode: ``eval`` or ``train`` (see :mod:`batchpilot.sweep.sharpness`).
        sharpness_samples: training samples in the Hessian's loss.
        sharpness_iters: power-iteration cap.
        sharpness_probes: Hutchinson probes.
        extra_trials: trials outside the grid (the plan's configuration).
        threads: torch CPU threads for the trials (``None``: leave torch's setting). Part of a
            trial's identity, since it changes the time to target.
    """

    workload: str
    batches: tuple[int, ...]
    workload_options: dict[str, Any] = field(default_factory=dict)
    lr_rule: str | None = None
    lr_multipliers: tuple[float, ...] = (1.0,)
    seeds: int = 1
    target: str | None = None
    max_epochs: float = 10.0
    warmup_epochs: float = 0.5
    evals_per_epoch: int = 16
    stop_at_target: bool = False
    sharpness: bool = True
    sharpness_mode: str = "eval"
    sharpness_samples: int = 256
    sharpness_iters: int = 20
    sharpness_probes: int = 8
    extra_trials: tuple[TrialSpec, ...] = ()
    threads: int | None = None

    def __post_init__(self) -> None:
        if not self.batches:
            raise BatchpilotError("batches must list at least one global batch, e.g. 32,64,128")
        for b in self.batches:
            require_positive_int("batch", b)
        if len(set(self.batches)) != len(self.batches):
            raise BatchpilotError(f"batches must not repeat, got {list(self.batches)}")
        if self.lr_rule is not None and self.lr_rule not in LR_RULES:
            raise BatchpilotError(f"lr rule must be one of {', '.join(LR_RULES)}, got {self.lr_rule!r}")
        if not self.lr_multipliers or any(not (m > 0 and math.isfinite(m)) for m in self.lr_multipliers):
            raise BatchpilotError(f"lr multipliers must be finite numbers > 0, got {list(self.lr_multipliers)}")
        require_positive_int("seeds", self.seeds)
        if self.target is not None:
            Target.parse(self.target)
        if not (self.max_epochs > 0 and math.isfinite(self.max_epochs)):
            raise BatchpilotError(f"max epochs must be > 0, got {self.max_epochs!r}")
        require_non_negative("warmup epochs", self.warmup_epochs)
        require_positive_int("evals per epoch", self.evals_per_epoch)
        for name in ("sharpness_samples", "sharpness_iters"):
            require_positive_int(name.replace("_", " "), getattr(self, name))
        if self.threads is not None:
            require_positive_int("threads", self.threads)
        if self.sharpness_mode not in ("eval", "train"):
            raise BatchpilotError(f"sharpness mode must be eval or train, got {self.sharpness_mode!r}")

    def common(self) -> dict[str, Any]:
        """The settings shared by every trial (part of each trial's identity)."""
        d = asdict(self)
        for k in ("batches", "lr_multipliers", "seeds", "extra_trials"):
            d.pop(k)
        d["version"] = STORE_VERSION
        return d

    @property
    def sweep_id(self) -> str:
        """A short hash of :meth:`common`: trials of compatible sweeps share it."""
        return _digest(self.common())[:16]

    def trials(self) -> list[TrialSpec]:
        """The grid (batch x multiplier x seed, in that order) followed by the extra trials."""
        grid = [TrialSpec(b, m, s) for b in self.batches for m in self.lr_multipliers for s in range(self.seeds)]
        return grid + [t for t in self.extra_trials if t not in grid]

    def trial_key(self, trial: TrialSpec) -> str:
        """The store key of ``trial``: a hash of the common settings and the trial's own."""
        return _digest({"common": self.common(), "trial": asdict(trial)})


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def warmup_steps_for(config: SweepConfig, workload: Workload, batch: int, lr: float) -> int:
    """Warmup steps: ``warmup_epochs`` worth of steps when the peak LR is above the base LR
    (Goyal et al. 2017 warm up to a *scaled-up* LR), else 0."""
    if lr <= workload.base_lr or config.warmup_epochs == 0:
        return 0
    return max(1, round(config.warmup_epochs * math.ceil(workload.num_train / batch)))


def run_trial(workload: Workload, config: SweepConfig, trial: TrialSpec, on_step: Callable[[dict], None] | None = None) -> dict:
    """Train one trial and measure it. Returns the trial's result as plain data."""
    from batchpilot.scaling.lr_rules import default_lr_rule, scale_lr
    from batchpilot.sweep.sharpness import measure_sharpness
    from batchpilot.train import TrainConfig, Trainer
    from batchpilot.train.loop import evaluate

    t0 = time.perf_counter()
    if trial.batch > workload.num_train:
        raise BatchpilotError(f"batch {trial.batch} is larger than the training set of {workload.name!r} ({workload.num_train})")
    rule = config.lr_rule or default_lr_rule(workload.optimizer_family())
    lr = trial.lr if trial.lr is not None else scale_lr(workload.base_lr, workload.base_batch, trial.batch, rule) * trial.lr_multiplier
    warmup = trial.warmup_steps if trial.warmup_steps is not None else warmup_steps_for(config, workload, trial.batch, lr)
    steps_per_epoch = math.ceil(workload.num_train / trial.batch)
    cfg = TrainConfig(global_batch=trial.batch, micro_batch_per_rank=trial.micro_batch, lr=lr, warmup_steps=warmup,
                      epochs=config.max_epochs, seed=trial.seed,
                      eval_every=max(1, steps_per_epoch // config.evals_per_epoch), target=config.target,
                      stop_at_target=config.stop_at_target)
    walls: list[float] = []

    def record(rec: dict) -> None:
        walls.append(rec["wall_s"])
        if on_step is not None:
            on_step(rec)

    trainer = Trainer(workload, cfg, on_step=record)
    res = trainer.run()
    step_s = statistics.median(b - a for a, b in zip([0.0] + walls, walls)) if walls else None
    target = trainer.target
    out: dict[str, Any] = {
        **asdict(trial), "lr": lr, "lr_rule": rule if trial.lr is None else "explicit", "warmup_steps": warmup,
        "micro_batch": res.micro_batch_per_rank, "status": res.status, "diverged": res.status == "diverged",
        "steps": res.steps, "epochs": res.samples / workload.num_train, "metric_name": workload.metric_name,
        "higher_is_better": workload.higher_is_better, "target": str(target) if target else None,
        "steps_to_target": res.steps_to_target, "examples_to_target": res.samples_to_target,
        "time_to_target_s": res.time_to_target_s, "train_wall_s": res.wall_s, "median_step_s": step_s,
        "median_time_to_target_s": step_s * res.steps_to_target if step_s is not None and res.steps_to_target else None,
        "threads": torch.get_num_threads(), "samples_per_s": res.samples_per_s,
        "final_train_loss": _finite(res.final_train_loss), "val_metric": _finite(res.val_metric),
        "val_loss": _finite(res.val_loss), "train_metric": None, "train_loss": None, "generalization_gap": None,
        "sharpness": None, "sharpness_s": None,
    }
    if res.status != "diverged":
        train = evaluate(trainer.model, workload, split="train")
        out["train_metric"], out["train_loss"] = _finite(train["train_metric"]), _finite(train["train_loss"])
        if out["train_metric"] is not None and out["val_metric"] is not None:
            sign = 1.0 if workload.higher_is_better else -1.0
            out["generalization_gap"] = sign * (out["train_metric"] - out["val_metric"])
        if config.sharpness:
            t1 = time.perf_counter()
            s = measure_sharpness(trainer.model, workload, mode=config.sharpness_mode, num_samples=config.sharpness_samples,
                                  max_iters=config.sharpness_iters, probes=config.sharpness_probes, seed=trial.seed)
            out["sharpness"] = {k: (_finite(v) if isinstance(v, float) else v) for k, v in s.to_dict().items()}
            out["sharpness_s"] = time.perf_counter() - t1
    out["trial_wall_s"] = time.perf_counter() - t0
    return out


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


RESULT_FIELDS: dict[str, str] = {
    "batch": "int", "lr_multiplier": "num", "seed": "int", "tag": "str", "lr": "num", "warmup_steps": "int",
    "micro_batch": "int?", "status": "str", "diverged": "bool", "steps": "int", "metric_name": "str",
    "higher_is_better": "bool", "steps_to_target": "int?", "examples_to_target": "int?",
    "time_to_target_s": "num?", "median_time_to_target_s": "num?", "val_metric": "num?", "train_metric": "num?",
    "generalization_gap": "num?", "samples_per_s": "num", "sharpness": "dict?",
}
"""The fields of a stored trial result that the analysis and the report read, with their types."""
_RESULT_STATUSES = ("completed", "target_reached", "diverged", "stopped")


def _type_ok(value: object, kind: str) -> bool:
    if value is None:
        return kind.endswith("?")
    kind = kind.rstrip("?")
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "num":
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, {"str": str, "dict": dict}[kind])


def result_problem(result: dict, trial: TrialSpec) -> str | None:
    """``None`` if ``result`` is a usable stored result of ``trial``, else why not (one line)."""
    for name, kind in RESULT_FIELDS.items():
        if name not in result:
            return f"stored result lacks {name!r}"
        if not _type_ok(result[name], kind):
            return f"stored result has {name} = {result[name]!r:.60}, expected {kind.replace('?', ' or null')}"
    if result["status"] not in _RESULT_STATUSES:
        return f"stored result has status {result['status']!r}, expected one of {', '.join(_RESULT_STATUSES)}"
    own = asdict(trial)
    for name in ("batch", "lr_multiplier", "seed", "tag"):
        if result[name] != own[name]:
            return f"stored result is of another trial ({name} {result[name]!r}, expected {own[name]!r})"
    if trial.lr is not None and result["lr"] != trial.lr:
        return f"stored result is of another trial (lr {result['lr']!r}, expected {trial.lr!r})"
    sharp = result["sharpness"]
    if sharp is not None and not all(sharp.get(k) is None or _type_ok(sharp.get(k), "num")
                                     for k in ("top_eigenvalue", "trace")):
        return "stored result has a sharpness that is not numeric"
    return None


@dataclass(frozen=True)
class SweepOutcome:
    """What a run of the sweep did: every trial's stored result, and what this process ran."""

    config: SweepConfig
    trials: tuple[dict, ...]
    ran: int
    skipped: int
    failed: tuple[dict, ...]
    wall_s: float


def run_sweep(config: SweepConfig, store: TrialStore, *, workload: Workload | Callable[[], Workload] | None = None,
              execute: Callable[..., dict] = run_trial, on_event: Event | None = None, poll_s: float = 2.0,
              heartbeat_s: float = 10.0,
              check_result: Callable[[dict, TrialSpec], str | None] | None = None) -> SweepOutcome:
    """Run every unfinished trial of ``config``, persisting each as it finishes.

    Trials already done in ``store`` are skipped (the workload is not even built when all are
    done). A trial another live process holds is waited for; one whose owner died is
    reclaimed. A trial that raises is marked failed and the sweep goes on (the next run
    retries it); a diverged trial is a result. Ctrl-C releases the running trial and re-raises.
    A stored row that is damaged (it does not decode, or its result fails :func:`result_problem`)
    is reported with an ``invalid`` event and its trial runs again.

    Args:
        config: the sweep.
        store: the trial store.
        workload: the workload, or a factory for it (default: built from ``config``).
        execute: ``execute(workload, config, trial, on_step) -> dict`` (tests substitute it).
        on_event: ``on_event(kind, info)`` for progress: ``start``, ``step``, ``finish``, ``skip``, ``wait``, ``fail``,
            ``invalid`` (``info``: ``trial`` or ``None``, ``key``, ``reason``).
        poll_s: how often to re-check trials held by other processes.
        heartbeat_s: heartbeat interval while a trial runs.
        check_result: ``check_result(result, trial) -> None`` or why a stored result is unusable (default:
            :func:`result_problem` when ``execute`` is :func:`run_trial`, else only that the row decodes).
    """
    t0 = time.perf_counter()
    emit = on_event or (lambda kind, info: None)
    specs = config.trials()
    keys = [config.trial_key(t) for t in specs]
    cache: list[Workload] = []

    def get_workload() -> Workload:
        if not cache:
            if isinstance(workload, Workload):
                cache.append(workload)
            elif callable(workload):
                cache.append(workload())
            else:
                from batchpilot.workloads import get_workload as build
                cache.append(build(config.workload, **config.workload_options))
            too_big = sorted({t.batch for t in specs if t.batch > cache[0].num_train})
            if too_big:
                raise BatchpilotError(f"batch {too_big[0]} is larger than the training set of {config.workload!r} "
                                      f"({cache[0].num_train} samples)")
        return cache[0]

    if check_result is None and execute is run_trial:
        check_result = result_problem
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, store, specs, keys, get_workload, execute, emit, poll_s, heartbeat_s, t0, check_result)
    finally:
        torch.set_num_threads(threads_before)


def _run(config, store, specs, keys, get_workload, execute, emit, poll_s, heartbeat_s, t0, check_result) -> SweepOutcome:
    ran = skipped = 0
    failed: list[dict] = []
    pending = list(zip(keys, specs))
    total = len(pending)
    while pending:
        busy = []
        for key, trial in pending:
            known_bad = key in store.invalid
            state = store.claim(key, config.sweep_id, {"common": config.common(), "trial": asdict(trial)},
                                check=None if check_result is None else (lambda result, t=trial: check_result(result, t)))
            if key in store.invalid and not known_bad:
                emit("invalid", {"trial": trial, "key": key, "reason": store.invalid[key]})
            if state == "done":
                skipped += 1
                emit("skip", {"trial": trial, "total": total})
                continue
            if state == "busy":
                busy.append((key, trial))
                continue
            emit("start", {"trial": trial, "total": total})
            try:
                w = get_workload()
                with Heartbeat(store, key, heartbeat_s):
                    result = execute(w, config, trial, lambda rec, t=trial: emit("step", {"trial": t, "record": rec}))
            except KeyboardInterrupt:
                store.fail(key, "interrupted")
                raise
            except BatchpilotError:
                store.fail(key, traceback.format_exc(limit=3))
                raise
            except Exception as exc:  # a crashed trial is recorded and the sweep goes on
                store.fail(key, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}")
                failed.append({**asdict(trial), "error": f"{type(exc).__name__}: {exc}"})
                emit("fail", {"trial": trial, "error": f"{type(exc).__name__}: {exc}"})
                continue
            if result.get("status") == "interrupted":
                store.fail(key, "interrupted")
                raise KeyboardInterrupt
            problem = check_result(result, trial) if check_result is not None else None
            if problem is not None:  # never store what a rerun would refuse
                error = f"the trial's result is unusable: {problem.replace('stored result', 'result')}"
                store.fail(key, error)
                failed.append({**asdict(trial), "error": error})
                emit("fail", {"trial": trial, "error": error})
                continue
            store.finish(key, result)
            ran += 1
            emit("finish", {"trial": trial, "result": result, "total": total})
        if busy:
            emit("wait", {"trials": [t for _, t in busy]})
            time.sleep(poll_s)
        pending = busy
    before = set(store.invalid)
    rows = store.rows(keys)
    for key in sorted(set(store.invalid) - before):
        emit("invalid", {"trial": None, "key": key, "reason": store.invalid[key]})
    by_key = dict(zip(keys, specs))
    done = []
    for r in rows:
        if r.status != "done" or r.result is None:
            continue
        problem = check_result(r.result, by_key[r.key]) if check_result is not None else None
        if problem is None:
            done.append(r.result)
        else:  # changed by another process after this one saw it done
            store.invalid[r.key] = f"{problem}; the next run runs the trial again"
            emit("invalid", {"trial": by_key[r.key], "key": r.key, "reason": store.invalid[r.key]})
    return SweepOutcome(config=config, trials=tuple(done), ran=ran, skipped=skipped, failed=tuple(failed),
                        wall_s=time.perf_counter() - t0)


def with_plan_trial(config: SweepConfig, plan: dict) -> tuple[SweepConfig, TrialSpec]:
    """Add the plan's configuration (global batch, LR, warmup, micro-batch) as an extra trial.

    A multi-rank plan runs here as one process with accumulation (exact without BatchNorm),
    so its time is this machine's, not the planned cluster's.
    """
    try:
        batch = int(plan["global_batch"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BatchpilotError("plan JSON must have an integer 'global_batch'") from exc
    require_positive_int("plan global_batch", batch)
    lr = plan.get("lr")
    warmup = plan.get("warmup_steps")
    micro = plan.get("micro_batch_per_rank")
    if micro is not None and (not isinstance(micro, int) or micro < 1 or batch % micro):
        micro = None
    spec = TrialSpec(batch=batch, lr=float(lr) if lr is not None else None,
                     warmup_steps=int(warmup) if warmup is not None else None,
                     micro_batch=micro if micro != batch else None, tag="plan")
    return replace(config, extra_trials=config.extra_trials + (spec,)), spec
