"""Small, fast inputs for the three reports: a plan from given measurements, sweep trials, a memory curve."""

from __future__ import annotations

from batchpilot.memory import MemoryCurve


def make_plan_dict(world_sizes=(1, 2, 4, 8)) -> dict:
    """A real plan (memory traced, measurements given) for mnist1d-mlp on 4000 samples, across world sizes."""
    from batchpilot.plan import make_plan
    from batchpilot.workloads import get_workload
    from plan_fakes import fake_curve, fake_probe

    w = get_workload("mnist1d-mlp", num_train=4000, num_val=100)
    return make_plan(w, probe=fake_probe(), throughput=fake_curve(), threads=1, world_sizes=list(world_sizes),
                     allreduce_gbps=25.0).to_dict()


def trial(batch, steps, *, mult=1.0, seed=0, val=0.9, train=0.95, tag="grid", time_s=None, median_s=None, eig=1.0,
          micro_batch=None, warmup=0):
    """One finished sweep trial as the runner stores it."""
    reached = steps is not None
    return {"batch": batch, "micro_batch": micro_batch or batch, "lr_multiplier": mult, "seed": seed, "lr": 0.1 * mult,
            "tag": tag, "steps_to_target": steps, "examples_to_target": steps * batch if reached else None,
            "time_to_target_s": (time_s if time_s is not None else steps * 0.01) if reached else None,
            "median_time_to_target_s": (median_s if median_s is not None else steps * 0.01) if reached else None,
            "val_metric": val, "train_metric": train, "generalization_gap": train - val, "diverged": False,
            "status": "completed", "metric_name": "val_acc", "higher_is_better": True, "target": "val_acc>=0.8",
            "samples_per_s": 1000.0, "sharpness": {"top_eigenvalue": eig, "trace": 10 * eig}, "steps": 100,
            "warmup_steps": warmup}


def reached_trials() -> list[dict]:
    """A grid whose steps follow S = 100 (1 + 128/B) and whose fastest batch is 128, plus the plan's trial at 128."""
    ts = []
    for b in (16, 32, 64, 128, 256, 512):
        steps = round(100 * (1 + 128 / b))
        t = steps * (0.005 + b / 40000)
        ts.append(trial(b, steps, eig=b / 10, val=0.9 - b / 10000, time_s=t, median_s=0.95 * t))
    return ts + [trial(128, 200, tag="plan", micro_batch=64, time_s=1.70, median_s=1.60)]


def unreached_trials() -> list[dict]:
    """Nothing reaches the target."""
    return [trial(b, None, val=0.5 - b / 10000) for b in (32, 64, 128)] + [trial(64, None, tag="plan")]


def memory_curve(grads: int = 0) -> MemoryCurve:
    """M(B) traced at 1..256, a few MiB, peak in the second backward with ``grads`` bytes of gradients live."""
    per = 600 * 1024
    pts = {b: 2 * 2**20 + per * b for b in (1, 4, 16, 64, 256)}
    return MemoryCurve(fixed_bytes=2 * 2**20, per_sample_bytes=per, peak_bytes_at=pts,
                       breakdown={"params": 443 * 1024, "grads": grads, "optimizer_state": 900 * 1024,
                                  "activations": 145 * 2**20, "temporaries": 16 * 2**20, "inputs": 256 * 1024},
                       method="fake-tensor mem_tracker", residual_frac=0.1, peak_phase_at={b: "step2.backward" for b in pts})
