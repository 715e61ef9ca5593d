"""Measure the seeds' memory claims with fake-tensor traces (no real allocation). Prints one block per claim.

Seed errors checked (seeds/README.md): 1 "Adam state = 8x params", 2 "gradients are O(batch)" /
"accumulation saves ~85%", 3 "BERT-base, batch 32, seq 512, fp32 Adam ~= 5.6 GB"; plus the issue's
GPT-2 small 8 x 1024 figure. The transformers models need ``batchpilot[hf]``.

Run:  .venv/bin/python bench/memory_seed_claims.py
"""

from __future__ import annotations

import time

from batchpilot.memory import format_bytes, memory_curve
from batchpilot.memory.hf import transformers_available
from batchpilot.memory.trace import trace_step
from batchpilot.workloads import get_workload


def adam_state() -> None:
    print("\n[1] Adam/AdamW state per parameter (state after the steady-state optimizer step)")
    names = ["mnist1d-cnn", "charlm"] + (["hf:gpt2"] if transformers_available() else [])
    for name in names:
        w = get_workload(name)
        t = trace_step(w, 1)
        end = t.phase_end_breakdown["step2.optimizer"]
        n_params = end["params"] / 4
        print(f"  {name:<12} params {format_bytes(end['params']):>11}  optimizer state {format_bytes(end['optimizer_state']):>11}"
              f"  = {end['optimizer_state'] / n_params:.3f} bytes/param = {end['optimizer_state'] / end['params']:.4f} x param bytes")


def grads_and_accumulation() -> None:
    print("\n[2] gradient memory vs batch (end of backward), and what accumulation saves")
    for name, batches in (("charlm", (1, 8, 64, 512)), ("mnist1d-cnn", (1, 32, 1024, 32768))):
        w = get_workload(name)
        row = []
        for b in batches:
            end = trace_step(w, b).phase_end_breakdown["step2.backward"]
            row.append(f"B={b}: {format_bytes(end['grads'])}")
        print(f"  {name:<12} grads " + ", ".join(row) + f"  (params {format_bytes(end['params'])})")
        c = memory_curve(w)
        for g, k in ((256, 4), (256, 16)):
            one, acc = c.peak_bytes(g), c.peak_bytes(g // k)
            print(f"  {name:<12} global batch {g}: one step {format_bytes(one)}, {k} x {g // k} accumulated "
                  f"{format_bytes(acc)}: saves {1 - acc / one:.1%}")


def transformers() -> None:
    if not transformers_available():
        print("\n[3] skipped: transformers not installed (pip install 'batchpilot[hf]')")
        return
    print("\n[3] BERT-base 32 x 512 and GPT-2 small 8 x 1024, fp32 AdamW, full step (seed 002 says 5.6 GB for BERT)")
    for name, head, b in (("hf:bert-base", "cls", 32), ("hf:bert-base", "lm", 32), ("hf:gpt2", "lm", 8)):
        w = get_workload(name, head=head)
        for target in ("cpu", "cuda"):
            t0 = time.perf_counter()
            t = trace_step(w, b, target=target)
            end = t.phase_end_breakdown["step2.optimizer"]
            weights_only = end["params"] * 4  # params + grads + Adam m, v: the weights-only estimators' figure
            print(f"  {w.name:<18} B={b:<3} {target:<5} peak {format_bytes(t.peak_bytes):>10} ({t.peak_bytes / 1e9:.1f} GB) "
                  f"at {t.peak_phase}; weights+grads+Adam {format_bytes(weights_only)}; "
                  f"activations {format_bytes(t.breakdown['activations'])}; {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    adam_state()
    grads_and_accumulation()
    transformers()
