"""Does the plan's choice hold still? Run ``batchpilot plan`` N times and compare the chosen batches.

The choice must not follow timing noise (issue: three runs on a busy machine chose 128, 32 and
256). Each run is a separate ``batchpilot plan --json`` process, exactly what a user runs. Prints
every run's global batch, split, LR and tie set, and the figure: max/min chosen global batch
(target <= 2).

    python bench/plan_stability.py --runs 5 [--workload mnist1d-cnn] [--plan-args "--no-lr-check"]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_plan(workload: str, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "batchpilot", "plan", "--workload", workload, "--json", "--no-report",
           "--out", str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"plan failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    data = json.loads(proc.stdout)
    data["_wall_s"] = time.perf_counter() - t0
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="mnist1d-cnn")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--plan-args", default="", help="extra arguments for batchpilot plan")
    ap.add_argument("--out", default=None, help="write the runs' summaries as JSON here")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            d = run_plan(args.workload, shlex.split(args.plan_args), Path(tmp) / str(i))
            row = {"run": i + 1, "global_batch": d["global_batch"], "micro_batch": d["micro_batch_per_rank"],
                   "accumulation": d["accumulation_steps"], "lr": d["lr"], "b_noise": d["noise_scale"],
                   "tied_batches": d.get("tied_batches"), "threads": d["threads"],
                   "base_lr": d["base_lr"], "wall_s": round(d["_wall_s"], 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    batches = [r["global_batch"] for r in rows]
    spread = max(batches) / min(batches)
    print(f"chosen global batches {batches}: max/min = {spread:.2f} (target <= 2)")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": rows, "max_over_min": spread}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
