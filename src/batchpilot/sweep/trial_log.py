"""``batchpilot sweep --log tensorboard|csv|jsonl``: every trial logs its steps as its own run.

A trial's run lives in ``<log dir>/<batch>-<lr multiplier>-<seed>-<tag>`` (e.g. ``b64-lrx1-s0-grid``), so
TensorBoard shows the trials side by side. A trial that runs again (its worker died, or it failed) starts its
run afresh: the sinks drop what an earlier attempt logged from its first step on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from batchpilot.sweep.runner import TrialSpec, run_trial


def trial_run_name(trial: TrialSpec) -> str:
    """The directory name of ``trial``'s run: ``b<batch>-lrx<multiplier>-s<seed>-<tag>``."""
    return f"b{trial.batch}-lrx{trial.lr_multiplier:g}-s{trial.seed}-{trial.tag}"


def logged_execute(kinds: Sequence[str], log_dir: str | Path, execute: Callable[..., dict] = run_trial) -> Callable[..., dict]:
    """``execute`` (default :func:`~batchpilot.sweep.runner.run_trial`) with each trial's steps logged to ``kinds``
    under ``log_dir/<trial run name>``."""
    from batchpilot.train.metrics_log import StepLogger, make_sinks

    kinds = tuple(kinds)

    def run(workload, config, trial, on_step):
        sinks = make_sinks(kinds, Path(log_dir) / trial_run_name(trial),
                           metric_columns=(getattr(workload, "metric_name", "val_metric"), "val_loss"))
        with StepLogger(sinks, then=on_step) as logger:
            return execute(workload, config, trial, logger)

    return run
