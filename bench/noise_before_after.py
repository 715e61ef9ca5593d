"""The per-example monitor of an earlier commit against today's, paired in one process.

Loads ``src/batchpilot/noise/per_example.py`` as it was at ``--rev`` (a single module at 9ac4779, the
commit before the conv routes and the module split) next to the current package, builds one model copy
per configuration (plain; exact, cheap layers and 8 examples, each old and new), and runs rounds of one
step of every configuration in a rotating order. Prints the median and interquartile range of each
configuration's paired ratio to the plain step of the same round, from the thread's CPU time.

    .venv/bin/python bench/noise_before_after.py --workload mnist1d-cnn --batch 128 --rounds 40 [--rev 9ac4779]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from batchpilot.noise import per_example as new
from batchpilot.train import accumulate_gradients
from batchpilot.workloads import get_workload
from batchpilot.workloads.data import fetch


def load_old(rev: str):
    """The monitor module as it was at ``rev`` (it must be one self-contained file there)."""
    root = Path(__file__).resolve().parents[1]
    text = subprocess.run(["git", "show", f"{rev}:src/batchpilot/noise/per_example.py"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "per_example_old.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("per_example_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["per_example_old"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="mnist1d-cnn")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--rev", default="9ac4779")
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = load_old(args.rev)
    w = get_workload(args.workload)
    torch.manual_seed(0)
    base = w.make_model()
    specs = [("plain", None, {})]
    for label, kw in (("exact", {}), ("cheap", {"layers": "cheap"}), ("8 ex", {"max_examples": 8})):
        specs += [(f"{label} old", old, kw), (f"{label} new", new, kw)]
    cfg = []
    for label, mod, kw in specs:
        m = w.make_model()
        m.load_state_dict(base.state_dict())
        cfg.append((label, m, w.make_optimizer(m.parameters(), w.base_lr), mod.PerExampleNoiseScale(m, **kw) if mod else None, []))
    g = torch.Generator().manual_seed(0)
    for r in range(args.rounds + 5):
        idx = torch.randint(0, w.num_train, (args.batch,), generator=g)
        for label, m, opt, mon, ts in cfg[r % len(cfg):] + cfg[: r % len(cfg)]:
            t0 = time.thread_time()
            accumulate_gradients(m, [fetch(w.train_data, idx)], w.loss_sum, w.count_units,
                                 after_micro=mon.after_micro if mon else None)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r >= 5:
                ts.append(time.thread_time() - t0)
    plain = cfg[0][4]
    print(f"{args.workload} batch {args.batch}: plain {statistics.median(plain) * 1e3:.2f} ms CPU, {args.rounds} "
          f"interleaved rounds; paired overhead, median [interquartile range]")
    for label, m, opt, mon, ts in cfg[1:]:
        q = sorted(a / b - 1 for a, b in zip(ts, plain))
        print(f"  {label:10s} {100 * statistics.median(q):+6.1f}%  [{100 * q[len(q) // 4]:+.1f}, "
              f"{100 * q[3 * len(q) // 4]:+.1f}]   B_simple {mon.estimate().b_simple:.1f}")


if __name__ == "__main__":
    main()
