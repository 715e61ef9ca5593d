"""The planner's independent grader: the plan's time to target against the best of a full batch x LR sweep.

For every workload (the built-ins ``mnist1d-cnn`` and ``mnist1d-mlp`` and the generated ones in
``bench/workloads/``):

1. **Plan.** ``batchpilot plan --workload ... --json --threads 1`` in a fresh process, exactly as a
   user runs it (plus ``--plan-args``); its wall clock is the planning cost.
2. **Sweep, without planner code.** Global batches ``base/4 x 2^k`` up to ``min(16 x base, N/4)`` (no
   accumulation), each at the LR that :func:`batchpilot.scaling.lr_rules.scale_lr` gives for the
   workload's optimizer family (linear for SGD, square root for Adam) times 0.5, 1 and 2 (and, where
   the best of them is the largest or smallest, x2 or /2 further out, up to ``--lr-extensions``
   times, so that the base LR's quality does not decide the sweep's best), each with 2 seeds, trained by the reference :class:`~batchpilot.train.Trainer` until the target (evaluated
   every 1/``--evals-per-epoch`` epoch). Steps to target of a (batch, LR) is the median over seeds;
   each batch keeps its best LR. Caps, so that hopeless trials end: every trial stops at
   ``--max-epochs``; the base batch runs first, and once it has reached the target in E0 epochs (best
   LR) a grid trial at batch B also stops after ``4 x E0 x max(1, B / B0)`` epochs (at a good LR the
   epochs to target grow by at most B / B0, McCandlish et al. 2018); a trial at LR multiplier 2 or
   0.5 also stops once it has taken ``seeds x`` the best median steps found at its batch so far (it
   can no longer be that batch's best: for 2 seeds the median is the mean). Such a trial counts as
   not reaching the target (``capped_early``). The plan's trials get the full ``--max-epochs``.
3. **Step time.** Measured separately, interleaved: every configuration (the grid batches and the
   plan's micro-batch x accumulation, as its real step) takes one step per round, round-robin, for
   about ``--timing-budget`` seconds (at least ``--timing-rounds`` rounds), median, on 1 thread, so
   load changes hit all of them alike. Time to target = steps to target x step time.
4. **B_crit.** ``S(B) = S_min (1 + B_crit / B)`` (McCandlish et al. 2018, eq. 2.11; equivalently
   ``E(B) = E_min (1 + B / B_crit)``) fitted by least squares on log steps (relative errors; steps span
   orders of magnitude) over the batches that reached the target; the RMS residual is reported.
5. **The plan in the same frame.** The plan's exact configuration (global batch, micro-batch x
   accumulation, LR, warmup, schedule) with the same seeds, time to target from its own interleaved
   step time. Reported: ``plan/best`` (time to target of the plan over the best sweep batch's), the
   plan's B_noise (``noise_scale`` and any other noise field of plan.json) against the fitted B_crit,
   and the planning cost as a share of the sweep's (plan wall clock / wall clock of all grid trials
   and the step timing).

Every finished trial is written to the ``--out`` JSON at once; a rerun with the same settings skips
the trials (and the plan) already there, so a killed bench loses at most the trial in progress.
The sweep uses no planner code: after a planner change, ``--replan`` grades the new planner against
the stored sweep at the cost of the plans and their own trials only.

    .venv/bin/python bench/plan_accuracy.py [--workloads generated|builtin|all|name,...] [--seeds 2]
        [--plan-args "--confirm"] [--out runs/plan_accuracy/plan_accuracy.json] [--quick]

``--quick`` is a smoke run (one generated workload, 2 batches, LR multiplier 1, 1 seed, at most 150
steps per trial, short plan budgets); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from batchpilot.scaling.lr_rules import default_lr_rule, scale_lr
from batchpilot.train import TrainConfig, Trainer
from batchpilot.workloads import get_workload

from _shared import batchpilot_exe, interleaved_step_times, run_plan_cli

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
GENERATED = {
    "mnist1d-shuffled-ln-adamw": "mnist1d_shuffled_ln.py",
    "tabular10-mlp-sgd": "tabular_sgd.py",
    "digits-cnn-gn-sgd": "digits_gn.py",
    "email-chargru-adam": "email_gru.py",
}
BUILTIN = ("mnist1d-cnn", "mnist1d-mlp")
GROUPS = {"generated": tuple(GENERATED), "builtin": BUILTIN, "all": (*GENERATED, *BUILTIN)}
TRIAL_VERSION = 1
"""Bumped when what a trial measures changes, so stored trials of an older bench are not reused."""
PLAN_ATTEMPTS, PLAN_RETRY_S = 3, 60.0
"""The checkout's planner may be mid-edit (others work in it): a failed plan is retried after a pause."""
CAP_SLACK = 4.0
"""Grid trials stop after this multiple of the epochs the base batch needed (scaled by B / B0 above it)."""
QUICK_PLAN_BUDGETS = {"--noise-budget": "4", "--throughput-budget": "3", "--lr-check-budget": "3",
                      "--confirm-budget": "5"}


# -- workloads -------------------------------------------------------------------------------------

def workload_spec(name: str) -> str:
    """A generated workload's ``file.py:make_workload`` path (absolute), else ``name`` itself."""
    if name in GENERATED:
        return f"{BENCH / 'workloads' / GENERATED[name]}:make_workload"
    stems = {Path(f).stem: n for n, f in GENERATED.items()}
    if name in stems:
        return workload_spec(stems[name])
    return name


def expand_workloads(text: str) -> list[str]:
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            out.extend(GROUPS.get(part, (part,)))
    return list(dict.fromkeys(out))


def grid_batches(base: int, num_train: int, *, low: float = 0.25, high: int = 16) -> list[int]:
    """``base/4 x 2^k`` up to ``min(16 x base, N/4)`` (at least the base batch)."""
    b = max(1, int(base * low))
    cap = max(base, min(high * base, num_train // 4))
    out = []
    while b <= cap:
        out.append(b)
        b *= 2
    return out


# -- the JSON state --------------------------------------------------------------------------------

def load_state(path: Path) -> dict:
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{path} is not readable JSON ({exc}); move it away to start afresh") from None
    return {"workloads": {}}


def save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_jsonable(state), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def code_version() -> dict:
    """The commit and a digest of uncommitted changes under src/ (other engineers edit the checkout)."""
    diff = _git("diff", "HEAD", "--", "src")
    untracked = _git("ls-files", "--others", "--exclude-standard", "src")
    return {"commit": _git("rev-parse", "HEAD"),
            "src_dirty": bool(diff or untracked),
            "src_diff_digest": hashlib.sha256(((diff or "") + (untracked or "")).encode()).hexdigest()[:12]
            if (diff or untracked) else None}


# -- the plan --------------------------------------------------------------------------------------

_PLAN_FLAGS: frozenset[str] | None = None


def supported_plan_flags() -> frozenset[str]:
    """The flags ``batchpilot plan --help`` lists (the planner's CLI is being rewritten: ask it).

    Only a successful answer is kept; a failing ``--help`` yields the two budgets every version has.
    """
    global _PLAN_FLAGS
    if _PLAN_FLAGS is None:
        proc = subprocess.run([batchpilot_exe(), "plan", "--help"], capture_output=True, text=True)
        if proc.returncode != 0:
            return frozenset({"--noise-budget", "--throughput-budget"})
        _PLAN_FLAGS = frozenset(tok.strip(",[]") for tok in proc.stdout.split() if tok.startswith("--"))
    return _PLAN_FLAGS


def plan_arguments(spec: str, extra: list[str], *, quick: bool) -> list[str]:
    args = ["--workload", spec]
    if "--threads" not in extra:
        args += ["--threads", "1"]  # the bench's frame: every trial and timing runs on one thread
    if quick:
        flags = supported_plan_flags()
        for flag, value in QUICK_PLAN_BUDGETS.items():
            if flag in flags and flag not in extra:
                args += [flag, value]
        if "--no-report" not in extra:
            args.append("--no-report")
    return args + extra


KEPT_PLAN_KEYS = ("workload", "global_batch", "micro_batch_per_rank", "accumulation_steps", "world_size", "lr",
                  "lr_rule", "warmup_steps", "schedule", "base_batch", "base_lr", "threads", "efficiency",
                  "samples_per_s", "goodput", "predicted_steps_to_target", "predicted_time_to_target_s",
                  "timings_s", "probe_cost_s", "tied_batches", "goodput_band", "caveats", "alternatives", "lr_check",
                  "version", "schema_version")


def noise_fields(plan: dict) -> dict:
    """Every noise number the plan reports: top-level ``*noise*`` scalars and the scalars of ``*noise*`` dicts."""
    out: dict = {}
    for key, value in plan.items():
        if "noise" not in key:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                    out[f"{key}.{k}"] = v
    return out


_REPLANNED: set[str] = set()


def run_plan(name: str, spec: str, rec: dict, plans_dir: Path, extra: list[str], *, quick: bool, state_path: Path,
             state: dict, quiet: bool = False, replan: bool = False) -> dict | None:
    """The stored plan made with the same arguments, else a new one (``None`` if the planner fails).

    ``replan``: plan again once in this process (the planner changed; the sweep, which uses no planner
    code, stays valid); the previous plan moves to ``plan_history``.
    """
    args = plan_arguments(spec, extra, quick=quick)
    key = _digest(args)
    old = rec.get("plan")
    if replan and name not in _REPLANNED:
        _REPLANNED.add(name)
        if old:
            rec.setdefault("plan_history", []).append(old)
        old = None
    if old and old.get("key") == key and old.get("plan"):
        if not quiet:
            print(f"[{name}] plan: reusing the stored plan ({old['wall_s']:.0f} s, {old['date']})", flush=True)
        return old["plan"]
    print(f"[{name}] plan: batchpilot plan {shlex.join(args)}", flush=True)
    out_dir = plans_dir / name
    entry = {"key": key, "args": args, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "code": code_version(),
             "load_avg_before": os.getloadavg()[0]}
    for attempt in range(PLAN_ATTEMPTS):
        try:
            plan, wall, proc = run_plan_cli(args, out_dir, env={"OMP_NUM_THREADS": "1"})
            break
        except (RuntimeError, subprocess.SubprocessError, OSError, json.JSONDecodeError) as exc:
            print(f"[{name}] plan FAILED (attempt {attempt + 1} of {PLAN_ATTEMPTS}): {str(exc)[-600:]}", flush=True)
            error = str(exc)[-3000:]
            if attempt + 1 < PLAN_ATTEMPTS:
                time.sleep(PLAN_RETRY_S)
    else:
        entry.update(error=error, plan=None)
        rec["plan"] = entry
        save_state(state_path, state)
        return None
    kept = {k: plan[k] for k in KEPT_PLAN_KEYS if k in plan}
    kept["noise_fields"] = noise_fields(plan)
    entry.update(wall_s=wall, plan=kept, plan_json=str(out_dir / "plan.json"), stderr_tail=proc.stderr[-1500:])
    rec["plan"] = entry
    save_state(state_path, state)
    print(f"[{name}] plan: {wall:.0f} s wall; batch {plan['global_batch']} = {plan['micro_batch_per_rank']} x "
          f"{plan['accumulation_steps']}, lr {plan['lr']:.4g}, warmup {plan['warmup_steps']}, "
          f"B_noise {_num(plan.get('noise_scale'))}", flush=True)
    return kept


# -- trials ----------------------------------------------------------------------------------------

def trial_key(batch: int, micro: int, lr: float, warmup: int, schedule: str, seed: int) -> str:
    return f"b{batch}|m{micro}|lr{lr:.10g}|w{warmup}|{schedule}|s{seed}"


def run_trial(w, *, batch: int, micro: int, lr: float, warmup: int, schedule: str, seed: int, max_steps: int,
              eval_every: int) -> dict:
    """Train one configuration with the reference trainer until the target or ``max_steps``."""
    cfg = TrainConfig(global_batch=batch, micro_batch_per_rank=micro if micro != batch else None, lr=lr,
                      warmup_steps=warmup, schedule=schedule, steps=max_steps, seed=seed, eval_every=eval_every,
                      stop_at_target=True)
    t0 = time.perf_counter()
    res = Trainer(w, cfg).run()
    wall = time.perf_counter() - t0
    reached = res.steps_to_target is not None
    return {"batch": batch, "micro": micro, "accumulation": batch // micro, "lr": lr, "warmup": warmup,
            "schedule": schedule, "seed": seed, "status": res.status, "reached": reached,
            "steps_to_target": res.steps_to_target, "samples_to_target": res.samples_to_target,
            "train_s_to_target": res.time_to_target_s, "steps": res.steps, "cap_steps": max_steps,
            "eval_every": eval_every, "final_metric": res.val_metric, "train_s": res.wall_s, "wall_s": wall}


def _steps(t: dict | None) -> float:
    return float(t["steps_to_target"]) if t and t.get("reached") else math.inf


def median_steps(trials: list[dict]) -> float:
    return statistics.median(_steps(t) for t in trials) if trials else math.inf


class Bench:
    def __init__(self, args: argparse.Namespace, state: dict, state_path: Path) -> None:
        self.args, self.state, self.path = args, state, state_path

    def settings(self, w) -> dict:
        a = self.args
        return {"trial_version": TRIAL_VERSION, "workload": w.name, "description": w.description,
                "num_train": w.num_train, "num_val": len(w.val_data), "base_batch": w.base_batch,
                "base_lr": w.base_lr, "target": str(w.target), "max_epochs": a.max_epochs, "max_steps": a.max_steps,
                "evals_per_epoch": a.evals_per_epoch, "grid_warmup_epochs": a.grid_warmup_epochs,
                "python": platform.python_version(), "torch": torch.__version__}

    def record(self, name: str, w) -> dict:
        recs = self.state.setdefault("workloads", {})
        rec = recs.get(name)
        settings = self.settings(w)
        if rec is not None and rec.get("settings") != settings:
            changed = sorted(k for k in settings if (rec.get("settings") or {}).get(k) != settings[k])
            print(f"[{name}] stored trials were made with other settings ({', '.join(changed)}): starting afresh",
                  flush=True)
            rec = None
        if rec is None:
            rec = recs[name] = {"settings": settings, "trials": {}}
        return rec

    def cap_steps(self, w, batch: int, *, base_epochs: float = math.inf, base_batch: int = 1) -> int:
        """Steps cap of a trial: ``--max-epochs`` (and ``--max-steps``); for grid trials, once the base batch
        has reached the target in ``base_epochs`` (its best LR), also ``CAP_SLACK x base_epochs x max(1, B / B0)``
        epochs: at the best LR the epochs to target grow by at most ``B / B0`` above the base batch and do not
        grow below it (McCandlish et al. 2018, E(B) = E_min (1 + B / B_crit))."""
        epochs = self.args.max_epochs
        if math.isfinite(base_epochs):
            epochs = min(epochs, CAP_SLACK * base_epochs * max(1.0, batch / base_batch))
        steps = max(1, math.ceil(epochs * math.ceil(w.num_train / batch)))
        return min(steps, self.args.max_steps) if self.args.max_steps else steps

    def eval_every(self, w, batch: int) -> int:
        return max(1, math.ceil(w.num_train / batch) // self.args.evals_per_epoch)

    def trial(self, name: str, w, rec: dict, tag: str, *, batch: int, micro: int, lr: float, warmup: int,
              schedule: str, seed: int, cap: int, label: str) -> dict:
        key = trial_key(batch, micro, lr, warmup, schedule, seed)
        done = rec["trials"].get(key)
        if done is not None and (done["reached"] or done["cap_steps"] >= cap or done["status"] == "diverged"):
            done.setdefault("tags", [])
            if tag not in done["tags"]:
                done["tags"].append(tag)
            return done
        t = run_trial(w, batch=batch, micro=micro, lr=lr, warmup=warmup, schedule=schedule, seed=seed, max_steps=cap,
                      eval_every=self.eval_every(w, batch))
        t["tags"] = [tag]
        t["capped_early"] = (not t["reached"]) and t["status"] != "diverged" and cap < self.cap_steps(w, batch)
        t["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
        rec["trials"][key] = t
        save_state(self.path, self.state)
        outcome = (f"target at step {t['steps_to_target']}" if t["reached"]
                   else ("stopped at its cap" if t["capped_early"] else t["status"]) + f" after {t['steps']} steps")
        print(f"[{name}] {tag:4s} {label} seed {seed}: {outcome} ({t['wall_s']:.1f} s)", flush=True)
        return t

    def run_workload(self, name: str, plans_dir: Path) -> dict:
        a = self.args
        spec = workload_spec(name)
        w = get_workload(spec)
        rec = self.record(name, w)
        rec["spec"] = spec
        rule = default_lr_rule(w.optimizer_family())
        rec["workload"] = {"name": w.name, "spec": spec, "num_train": w.num_train, "base_batch": w.base_batch,
                           "base_lr": w.base_lr, "target": str(w.target), "optimizer": w.optimizer_family(),
                           "lr_rule": rule}
        plan = run_plan(name, spec, rec, plans_dir, a.plan_args, quick=a.quick, state_path=self.path, state=self.state,
                        quiet=True, replan=a.replan)
        seeds = list(range(a.seeds))
        # the plan's exact configuration (world size > 1: the same global batch by accumulation on one process)
        plan_cfg = None
        if plan is not None:
            micro = plan["micro_batch_per_rank"]
            if plan["global_batch"] > w.num_train:
                print(f"[{name}] the plan's batch {plan['global_batch']} exceeds the training set", flush=True)
            else:
                plan_cfg = dict(batch=plan["global_batch"], micro=micro, lr=float(plan["lr"]),
                                warmup=int(plan["warmup_steps"]), schedule=plan.get("schedule") or "constant")
                for s in seeds:
                    self.trial(name, w, rec, "plan", **plan_cfg, seed=s, cap=self.cap_steps(w, plan_cfg["batch"]),
                               label=f"batch {plan_cfg['batch']} ({micro}x{plan_cfg['batch'] // micro}) "
                                     f"lr {plan_cfg['lr']:.4g} warmup {plan_cfg['warmup']}")
        # the independent sweep: the base batch first, its epochs to target cap the other batches
        batches = a.batches or grid_batches(w.base_batch, w.num_train)
        if a.quick:
            batches = [b for b in (w.base_batch, 2 * w.base_batch) if b <= w.num_train]
        order = sorted(batches, key=lambda b: (b != w.base_batch, b))
        mults = sorted(a.lr_multipliers, key=lambda m: (abs(math.log(m)), -m))  # 1 first, then 2, 0.5, ...
        grid: dict[int, dict[float, list[dict]]] = {}
        base_epochs = math.inf
        for b in order:
            rule_lr = scale_lr(w.base_lr, w.base_batch, b, rule)
            full_cap = self.cap_steps(w, b, base_epochs=base_epochs, base_batch=w.base_batch)
            best = math.inf
            medians: dict[float, float] = {}
            todo, extensions = list(mults), 0
            while todo:
                m = todo.pop(0)
                lr = rule_lr * m
                warmup = (max(1, round(a.grid_warmup_epochs * math.ceil(w.num_train / b)))
                          if a.grid_warmup_epochs > 0 and lr > w.base_lr else 0)
                cap = full_cap if not math.isfinite(best) else min(full_cap, int(len(seeds) * best))
                trials = [self.trial(name, w, rec, "grid", batch=b, micro=b, lr=lr, warmup=warmup, schedule="constant",
                                     seed=s, cap=cap, label=f"batch {b} lr x{m:g} ({lr:.4g})") for s in seeds]
                grid.setdefault(b, {})[m] = trials
                medians[m] = median_steps(trials)
                best = min(best, medians[m])
                if not todo and extensions < a.lr_extensions and math.isfinite(best):
                    # the best LR at the edge of the multipliers tried: try one step (x2 or /2) further out
                    winner = min(medians, key=lambda k: (medians[k], abs(math.log(k))))
                    if winner == max(medians):
                        todo.append(winner * 2)
                    elif winner == min(medians):
                        todo.append(winner / 2)
                    extensions += bool(todo)
            if b == w.base_batch and math.isfinite(best):
                base_epochs = best * b / w.num_train
        grid = dict(sorted(grid.items()))
        # step time, interleaved
        configs = [(b, b) for b in batches] + ([(plan_cfg["batch"], plan_cfg["micro"])] if plan_cfg else [])
        configs = list(dict.fromkeys(configs))
        ckey = [list(c) for c in configs]
        timing = rec.get("timing")
        tspec = {"min_rounds": a.timing_rounds, "warmup": a.timing_warmup, "budget_s": a.timing_budget}
        if not timing or timing.get("configs") != ckey or timing.get("spec") != tspec:
            print(f"[{name}] timing {len(configs)} configurations in interleaved rounds (at least {a.timing_rounds}, "
                  f"about {a.timing_budget:g} s)", flush=True)
            t0 = time.perf_counter()
            load = os.getloadavg()[0]
            times = interleaved_step_times(w, configs, rounds=a.timing_rounds, warmup=a.timing_warmup,
                                           time_budget_s=a.timing_budget)
            timing = {"configs": ckey, "spec": tspec, "rounds": len(next(iter(times.values()))),
                      "wall_s": time.perf_counter() - t0,
                      "load_avg_before": load, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "times_s": {f"{b}x{m}": v for (b, m), v in times.items()}}
            rec["timing"] = timing
            save_state(self.path, self.state)
        step_s = {tuple(c): statistics.median(timing["times_s"][f"{c[0]}x{c[1]}"]) for c in ckey}
        rec["summary"] = summary = summarize(rec, grid, step_s, plan, plan_cfg, seeds, w)
        save_state(self.path, self.state)
        print_workload(name, summary)
        return summary


# -- analysis --------------------------------------------------------------------------------------

def fit_b_crit(batches: list[int], steps: list[float]) -> dict:
    """Least squares of ``log S = log S_min + log(1 + B_crit / B)`` over the finite points."""
    pts = [(float(b), float(s)) for b, s in zip(batches, steps) if math.isfinite(s) and s > 0]
    out: dict = {"n_points": len(pts), "batches": [int(b) for b, _ in pts]}
    if len(pts) < 2:
        out["note"] = f"only {len(pts)} batch reached the target: no fit"
        return out
    bs = [b for b, _ in pts]
    logs = [math.log(s) for _, s in pts]

    def solve(bc: float) -> tuple[float, float]:
        r = [ls - math.log1p(bc / b) for b, ls in zip(bs, logs)]
        log_smin = sum(r) / len(r)
        return log_smin, sum((x - log_smin) ** 2 for x in r)

    lo, hi = min(bs) / 1e3, max(bs) * 1e3
    grid = [0.0] + [lo * (hi / lo) ** (i / 400) for i in range(401)]
    sse = [solve(bc)[1] for bc in grid]
    i = min(range(len(grid)), key=sse.__getitem__)
    bc = grid[i]
    if 0 < i < len(grid) - 1:  # golden-section refinement in log B_crit between the neighbours
        a_, b_ = math.log(grid[i - 1] if i > 1 else lo), math.log(grid[i + 1])
        g = (math.sqrt(5) - 1) / 2
        for _ in range(60):
            c_, d_ = b_ - g * (b_ - a_), a_ + g * (b_ - a_)
            if solve(math.exp(c_))[1] < solve(math.exp(d_))[1]:
                b_ = d_
            else:
                a_ = c_
        bc = math.exp((a_ + b_) / 2)
    log_smin, err = solve(bc)
    out.update(b_crit=bc, s_min=math.exp(log_smin), e_min=math.exp(log_smin) * bc,
               rms_log_residual=math.sqrt(err / len(pts)))
    if i == 0 or bc <= lo * 1.0001:
        out["note"] = f"B_crit at the fit's lower bound: steps barely fall with the batch (B_crit << {min(bs):g})"
    elif i == len(grid) - 1:
        out["note"] = f"B_crit at the fit's upper bound: perfect scaling over the whole grid (B_crit >> {max(bs):g})"
    elif len(pts) < 3:
        out["note"] = "fewer than 3 batches reached the target: the fit is exact and unchecked"
    return out


def summarize(rec: dict, grid: dict, step_s: dict, plan: dict | None, plan_cfg: dict | None, seeds: list[int],
              w) -> dict:
    per_batch = []
    for b, by_m in sorted(grid.items()):
        meds = {m: median_steps(ts) for m, ts in by_m.items()}
        best_m = min(meds, key=lambda m: (meds[m], abs(math.log(m))))
        st = step_s[(b, b)]
        per_batch.append({"batch": b, "best_lr_multiplier": best_m, "lr": by_m[best_m][0]["lr"],
                          "lr_at_edge": len(meds) > 1 and best_m in (min(meds), max(meds)),
                          "median_steps_by_multiplier": {f"{m:g}": meds[m] for m in sorted(meds)},
                          "steps_to_target": meds[best_m], "step_s": st, "time_to_target_s": meds[best_m] * st,
                          "samples_to_target": meds[best_m] * b})
    finite = [r for r in per_batch if math.isfinite(r["time_to_target_s"])]
    best = min(finite, key=lambda r: r["time_to_target_s"]) if finite else None
    if best is not None:  # the sweep's optimum may lie beyond the grid: then "best" is only the grid's best
        best = {**best, "at_grid_edge": best["batch"] in (per_batch[0]["batch"], per_batch[-1]["batch"])}
    fit = fit_b_crit([r["batch"] for r in per_batch], [r["steps_to_target"] for r in per_batch])
    out: dict = {"per_batch": per_batch, "best": best, "fit": fit}
    grid_trials = [t for t in rec["trials"].values() if "grid" in t.get("tags", ())]
    sweep_s = sum(t["wall_s"] for t in grid_trials) + (rec.get("timing") or {}).get("wall_s", 0.0)
    out["sweep_wall_s"] = sweep_s
    out["sweep_trials"] = len(grid_trials)
    entry = rec.get("plan") or {}
    out["plan_wall_s"] = entry.get("wall_s")
    out["cost_share"] = entry["wall_s"] / sweep_s if entry.get("wall_s") and sweep_s > 0 else None
    if plan is not None:
        out["plan"] = {k: plan.get(k) for k in ("global_batch", "micro_batch_per_rank", "accumulation_steps", "lr",
                                               "lr_rule", "warmup_steps", "schedule", "predicted_steps_to_target",
                                               "predicted_time_to_target_s")}
        out["noise"] = plan.get("noise_fields", {})
        b_noise = plan.get("noise_fields", {}).get("noise_scale")
        out["b_noise"] = b_noise
        if fit.get("b_crit") and b_noise:
            out["b_noise_over_b_crit"] = b_noise / fit["b_crit"]
        rule_lr = scale_lr(w.base_lr, w.base_batch, plan["global_batch"], default_lr_rule(w.optimizer_family()))
        out["plan"]["lr_over_rule_lr"] = plan["lr"] / rule_lr
    if plan_cfg is not None:
        trials = [rec["trials"][trial_key(**plan_cfg, seed=s)] for s in seeds]
        steps = median_steps(trials)
        st = step_s[(plan_cfg["batch"], plan_cfg["micro"])]
        out["plan_measured"] = {"steps_to_target": steps, "step_s": st, "time_to_target_s": steps * st,
                                "reached": [t["reached"] for t in trials], "status": [t["status"] for t in trials]}
        if best is not None:
            out["plan_over_best"] = steps * st / best["time_to_target_s"]
        predicted = (plan or {}).get("predicted_steps_to_target")
        if predicted and math.isfinite(steps):
            out["plan_measured"]["predicted_over_measured_steps"] = predicted / steps
        same = next((r for r in per_batch if r["batch"] == plan_cfg["batch"]), None)
        if same is not None and plan_cfg["micro"] == plan_cfg["batch"] and math.isfinite(same["time_to_target_s"]):
            out["plan_over_same_batch_best_lr"] = steps * st / same["time_to_target_s"]
    return out


# -- printing --------------------------------------------------------------------------------------

def _num(x, fmt: str = ".0f") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, fmt)


def print_workload(name: str, s: dict) -> None:
    print(f"[{name}] sweep (best LR per batch; time = median steps x interleaved step time):", flush=True)
    for r in s["per_batch"]:
        mark = " <- best" if s["best"] and r["batch"] == s["best"]["batch"] else ""
        meds = ", ".join(f"x{m} {_num(v)}" for m, v in r["median_steps_by_multiplier"].items())
        edge = " at the edge" if r.get("lr_at_edge") else ""
        print(f"    batch {r['batch']:>5}: steps {_num(r['steps_to_target']):>6} (lr x{r['best_lr_multiplier']:g}{edge}; {meds}), "
              f"step {r['step_s'] * 1e3:7.2f} ms, time {_num(r['time_to_target_s'], '.2f'):>7} s{mark}", flush=True)
    pm = s.get("plan_measured")
    if pm:
        print(f"    plan {s['plan']['global_batch']} ({s['plan']['micro_batch_per_rank']}x{s['plan']['accumulation_steps']}): "
              f"steps {_num(pm['steps_to_target'])}, step {pm['step_s'] * 1e3:.2f} ms, time "
              f"{_num(pm['time_to_target_s'], '.2f')} s; plan/best {_num(s.get('plan_over_best'), '.2f')}", flush=True)
    f = s["fit"]
    print(f"    B_crit fit: {_num(f.get('b_crit'))} (S_min {_num(f.get('s_min'))}, rms log residual "
          f"{_num(f.get('rms_log_residual'), '.3f')}, {f['n_points']} batches){'; ' + f['note'] if f.get('note') else ''}",
          flush=True)


def print_table(state: dict, names: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    meta = state["meta"]
    table = Table(title=f"batchpilot plan vs an independent sweep ({meta.get('finished') or meta['date']}, 1 thread)")
    for col in ("workload", "target", "plan batch\n(micro×acc)", "plan LR\n(/rule)", "best sweep\nbatch (LR×)",
                "plan/best\ntime", "B_noise\n(plan)", "B_crit\n(fit, rms)", "B_noise/\nB_crit", "plan s",
                "sweep s", "cost\nshare"):
        table.add_column(col, justify="right" if col not in ("workload", "target") else "left")
    for name in names:
        rec = state["workloads"].get(name)
        s = (rec or {}).get("summary")
        if not s:
            table.add_row(name, "", "not run")
            continue
        p = s.get("plan") or {}
        best = s.get("best")
        fit = s["fit"]
        ratio = s.get("plan_over_best")
        style = "" if ratio is None else ("green" if ratio <= 1.1 else ("yellow" if ratio <= 1.5 else "red"))
        table.add_row(
            name, rec["workload"]["target"],
            f"{p['global_batch']} ({p['micro_batch_per_rank']}×{p['accumulation_steps']})" if p else "plan failed",
            f"{p['lr']:.3g} (×{p['lr_over_rule_lr']:.2f})" if p else "",
            (f"{best['batch']} (×{best['best_lr_multiplier']:g})" + ("ᵉ" if best.get("at_grid_edge") else ""))
            if best else "none reached",
            f"[{style}]{_num(ratio, '.2f')}[/{style}]" if style else _num(ratio, ".2f"),
            _num(s.get("b_noise")),
            f"{_num(fit.get('b_crit'))} ({_num(fit.get('rms_log_residual'), '.2f')})" + ("*" if fit.get("note") else ""),
            _num(s.get("b_noise_over_b_crit"), ".2f"),
            _num(s.get("plan_wall_s")), _num(s.get("sweep_wall_s")),
            _num(100 * s["cost_share"], ".1f") + "%" if s.get("cost_share") else "n/a",
        )
    Console(width=200).print(table)
    notes = [f"{n}: {state['workloads'][n]['summary']['fit']['note']}" for n in names
             if state["workloads"].get(n, {}).get("summary", {}).get("fit", {}).get("note")]
    for n in notes:
        print(f"  * {n}")
    if any(((state["workloads"].get(n) or {}).get("summary") or {}).get("best", {}) and
           state["workloads"][n]["summary"]["best"].get("at_grid_edge") for n in names):
        print("  ᵉ the best sweep batch is at the edge of the grid: the true optimum may lie beyond it")
    print("  plan/best: time to target of the plan's configuration / of the best sweep batch at its best LR (median "
          "steps over seeds x interleaved step time); cost share: plan wall clock / sweep wall clock")


# -- main ------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default=None,
                    help="comma-separated names: generated, builtin, all (default), a built-in, a generated workload's "
                         f"name ({', '.join(GENERATED)}) or a file.py:fn path")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--lr-multipliers", default="0.5,1,2", help="around the rule's LR; each batch keeps its best")
    ap.add_argument("--lr-extensions", type=int, default=3,
                    help="when a batch's best LR is the largest (smallest) multiplier tried, try x2 (/2) further, up "
                         "to this many times (default 3: x16 .. x1/32 at most), so the sweep's best LR is interior")
    ap.add_argument("--batches", default=None, help="override the grid, e.g. 16,64,256")
    ap.add_argument("--max-epochs", type=float, default=30.0, help="cap of every trial (default 30)")
    ap.add_argument("--max-steps", type=int, default=None, help="also cap every trial at this many steps")
    ap.add_argument("--evals-per-epoch", type=int, default=20, help="validation evaluations per epoch (default 20)")
    ap.add_argument("--grid-warmup-epochs", type=float, default=0.0,
                    help="linear warmup of grid trials whose LR exceeds the base LR, in epochs (default 0: none)")
    ap.add_argument("--timing-rounds", type=int, default=15, help="least interleaved timing rounds (default 15)")
    ap.add_argument("--timing-budget", type=float, default=20.0,
                    help="seconds of interleaved timing per workload; more rounds when they fit (default 20)")
    ap.add_argument("--timing-warmup", type=int, default=2)
    ap.add_argument("--plan-args", default="", help='extra arguments for batchpilot plan, e.g. "--confirm"')
    ap.add_argument("--replan", action="store_true",
                    help="plan again even where a plan with the same arguments is stored (the planner changed); "
                         "the stored sweep is reused, so only the new plan's trials run")
    ap.add_argument("--report-only", action="store_true", help="print the table of the results in --out; run nothing")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 batches, LR x1, 1 seed, <= 150 steps per trial")
    ap.add_argument("--out", default=None, help="results JSON (default runs/plan_accuracy/plan_accuracy.json, "
                                                "runs/plan_accuracy/quick.json with --quick)")
    args = ap.parse_args(argv)
    args.plan_args = shlex.split(args.plan_args)
    args.lr_multipliers = tuple(float(x) for x in args.lr_multipliers.split(","))
    args.batches = [int(x) for x in args.batches.split(",")] if args.batches else None
    if args.quick:
        args.seeds, args.lr_multipliers, args.lr_extensions = 1, (1.0,), 0
        args.max_steps = min(args.max_steps or 150, 150)
        args.timing_rounds, args.timing_warmup, args.timing_budget = 3, 1, 1.0
        args.workloads = args.workloads or "mnist1d-shuffled-ln-adamw"
    args.workloads_given = args.workloads is not None
    args.workloads = expand_workloads(args.workloads or "all")
    default_out = REPO / "runs" / "plan_accuracy" / ("quick.json" if args.quick else "plan_accuracy.json")
    args.out = Path(args.out) if args.out else default_out
    if args.seeds < 1 or any(not m > 0 for m in args.lr_multipliers):
        ap.error("--seeds must be >= 1 and LR multipliers > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    state = load_state(args.out)
    if args.report_only:
        if "meta" not in state:
            raise SystemExit(f"{args.out} holds no results")
        print_table(state, [n for n in args.workloads if n in state["workloads"]] if args.workloads_given
                    else list(state["workloads"]))
        return 0
    state["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.platform(),
                     "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                     "threads": 1, "argv": sys.argv[1:], "code": code_version(), "quick": args.quick}
    plans_dir = args.out.with_name(args.out.stem + "_plans")
    bench = Bench(args, state, args.out)
    t0 = time.perf_counter()
    # all plans first: they run the checkout's planner, which others may be editing, so take them together
    for name in args.workloads:
        spec = workload_spec(name)
        w = get_workload(spec)
        rec = bench.record(name, w)
        entry = rec.get("plan")
        run_plan(name, spec, rec, plans_dir, args.plan_args, quick=args.quick, state_path=args.out, state=state,
                 replan=args.replan)
    for name in args.workloads:
        try:
            bench.run_workload(name, plans_dir)
        except Exception:  # one broken workload must not cost the others' results
            import traceback

            traceback.print_exc()
            print(f"[{name}] FAILED (above); its finished trials are kept in {args.out}", flush=True)
    state["meta"]["bench_wall_s_this_run"] = time.perf_counter() - t0
    state["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    save_state(args.out, state)
    print()
    print_table(state, args.workloads)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
