"""Wall time of ``batchpilot plan`` with no workload arguments, in a fresh process (imports included).

Prints the total, the time of each stage from plan.json, and the choice. Target: < 2 minutes on 2 cores.

    .venv/bin/python bench/plan_walltime.py [--repeats 1] [extra plan args...]
"""

from __future__ import annotations

import argparse
import os
import tempfile

from _shared import run_plan_cli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    args, extra = ap.parse_known_args()
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                plan, wall, _ = run_plan_cli(extra, tmp)
            except RuntimeError as exc:
                raise SystemExit(str(exc)) from None
            outputs = sorted(os.listdir(tmp))
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in plan["timings_s"].items() if k != "plan")
        print(f"run {i}: batchpilot plan {' '.join(extra)} took {wall:.1f} s wall (target < 120 s); {stages}; "
              f"outputs {outputs}")
        print(f"  chose batch {plan['global_batch']} = {plan['micro_batch_per_rank']} x {plan['accumulation_steps']} "
              f"x {plan['world_size']}, lr {plan['lr']:.4g} ({plan['lr_rule']}), warmup {plan['warmup_steps']}, "
              f"B_noise {plan['noise_scale']:.0f}, threads {plan['threads']}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
