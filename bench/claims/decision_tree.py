"""Claim (seed 002, "Quick Batch Size Decision Tree"): five questions give the batch to use.

    1. memory: < 8 GB → 16-32; 8-16 GB → 32-64; 16-24 GB → 64-128; 24+ GB → 128-256
    2. target batch fits? yes → use it (LR scaling); no by < 2x → accumulation; by > 2x → smaller batch
    3. accuracy → 32-128; speed → 256-1024; both → accumulation + mixed precision
    4. fine-tuning → 16-32, small LR; from scratch → 64-256, scale the LR
    5. distributed → per-GPU 32-64, accumulate to 256-512; single device → 64-256

The tree is applied as written: the answer is the intersection of the ranges of questions 1, 4 and 5 (from
scratch, one device; question 2 never fires on these small models) and, separately, question 3's "speed" and
"accuracy" branches. The memory is this machine's RAM (``--memory-gb``, default from /proc/meminfo).

With ``--sweep`` (the results JSON of ``bench/plan_accuracy.py``: a batch × LR sweep of six workloads with
their steps to target and interleaved step times, and ``batchpilot plan``'s choice graded in the same frame),
each answer is priced: the time to target of the batches of the sweep's grid inside the tree's range, over
the sweep's best; next to the plan's batch and its plan/best.

    python bench/claims/decision_tree.py                                    # the tree's answers, instant
    python bench/claims/decision_tree.py --sweep runs/plan_accuracy/replan.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MEMORY = ((8, (16, 32)), (16, (32, 64)), (24, (64, 128)), (float("inf"), (128, 256)))


def tree(memory_gb: float, *, finetune: bool = False, distributed: bool = False) -> dict[str, tuple[int, int] | None]:
    """The tree's batch ranges: ``default`` (questions 1, 4, 5 intersected), ``speed`` and ``accuracy`` (question 3)."""
    q1 = next(r for limit, r in MEMORY if memory_gb < limit)
    q4 = (16, 32) if finetune else (64, 256)
    q5 = (32, 64) if distributed else (64, 256)
    lo, hi = max(q1[0], q4[0], q5[0]), min(q1[1], q4[1], q5[1])
    return {"default": (lo, hi) if lo <= hi else None, "speed": (256, 1024), "accuracy": (32, 128)}


def machine_memory_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise SystemExit("no MemTotal in /proc/meminfo: pass --memory-gb")


def fmt(r) -> str:
    return "none (the questions conflict)" if r is None else f"{r[0]}–{r[1]}"


def priced(per_batch: list[dict], best_t: float, r) -> str:
    """Time to target over the best for the grid batches inside ``r``: 'best–worst (batches)'."""
    if r is None:
        return "—"
    inside = [p for p in per_batch if r[0] <= p["batch"] <= r[1]]
    if not inside:
        return "no grid batch in range"
    ratios = [(p["time_to_target_s"] / best_t if p.get("time_to_target_s") else float("inf"), p["batch"]) for p in inside]
    shown = ", ".join(f"{b}: {x:.2f}" if x != float("inf") else f"{b}: never" for x, b in ratios)
    return shown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory-gb", type=float, default=None)
    ap.add_argument("--sweep", default=None, help="bench/plan_accuracy.py's results JSON")
    args = ap.parse_args()
    mem = args.memory_gb if args.memory_gb is not None else machine_memory_gb()
    ans = tree(mem)
    print(f"memory {mem:.1f} GB, from scratch, one device: default {fmt(ans['default'])}; speed {fmt(ans['speed'])}; "
          f"accuracy {fmt(ans['accuracy'])}")
    for gb in (6, 12, 20, 80):
        print(f"  (at {gb} GB: default {fmt(tree(gb)['default'])}; fine-tuning {fmt(tree(gb, finetune=True)['default'])}; "
              f"distributed {fmt(tree(gb, distributed=True)['default'])})")
    if not args.sweep:
        return
    data = json.loads(Path(args.sweep).read_text())
    print(f"\nsweep: {args.sweep} ({data['meta'].get('date', '?')}); time to target / the sweep's best, per grid batch")
    print("| workload | sweep's best batch | tree default | tree 'speed' | tree 'accuracy' | plan batch: plan/best |")
    print("|---|---:|---|---|---|---|")
    for name, w in data["workloads"].items():
        s = w.get("summary") or {}
        per = [p for p in s.get("per_batch", []) if p.get("time_to_target_s")]
        if not per:
            continue
        best = min(per, key=lambda p: p["time_to_target_s"])
        plan = (w.get("plan") or {}).get("plan") or {}
        ratio = s.get("plan_over_best")
        print(f"| {name} | {best['batch']} | {priced(per, best['time_to_target_s'], ans['default'])} | "
              f"{priced(per, best['time_to_target_s'], ans['speed'])} | "
              f"{priced(per, best['time_to_target_s'], ans['accuracy'])} | "
              f"{plan.get('global_batch', '?')}: {ratio:.2f} |" if ratio else "| — |")


if __name__ == "__main__":
    main()
