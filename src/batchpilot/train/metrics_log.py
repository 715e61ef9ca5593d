"""Training metrics where users look at them: TensorBoard event files, a CSV file, or JSON lines.

:class:`StepLogger` is an ``on_step`` hook of the :class:`~batchpilot.train.loop.Trainer` (``batchpilot train
--log tensorboard|csv|jsonl``). Every step it logs the loss, LR, global batch, samples, epoch and samples/s;
at evaluations the validation loss and metric; and the gradient noise scale B_simple with its bootstrap
interval at **every step it is measured** (not only at evaluations, as in ``metrics.jsonl``): whenever the
noise monitor has seen a new step, its estimate is read and logged at that step.

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package:
  ``pip install 'batchpilot[tensorboard]'``), tags ``train/loss``, ``train/lr``, ``train/batch_size``,
  ``train/samples_per_s``, ``train/epoch``, ``val/<metric>``, ``noise/b_simple``, ``noise/b_simple_low`` and
  ``noise/b_simple_high``. A resumed run purges the events after its resume step, so the curves do not
  fold back.
- ``csv``: ``metrics.csv``, one row per step with fixed columns (empty where a value was not measured at
  that step); a resumed run keeps only the rows before its first new step.
- ``jsonl``: ``steps.jsonl``, one JSON object per step with the same fields as the CSV (``metrics.jsonl``,
  the trainer's own record, is written whenever there is an output directory, as before).

The Lightning and Hugging Face callbacks (:mod:`batchpilot.integrations`) log through their frameworks'
loggers instead; this module is for batchpilot's own trainer (and each trial of a sweep, as its own run).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

from batchpilot.errors import BatchpilotError

LOG_KINDS = ("tensorboard", "csv", "jsonl")
BASE_COLUMNS = ("step", "loss", "lr", "batch", "samples", "epoch", "wall_s", "samples_per_s")
NOISE_COLUMNS = ("b_simple", "b_simple_low", "b_simple_high", "noise_steps")
TENSORBOARD_DIR = "tensorboard"
CSV_NAME = "metrics.csv"
JSONL_NAME = "steps.jsonl"


def parse_log_kinds(values: Iterable[str] | None) -> tuple[str, ...]:
    """``--log`` values (repeatable, or comma-separated) as a tuple of :data:`LOG_KINDS`, in order, no repeats."""
    kinds: list[str] = []
    for value in values or ():
        for part in str(value).split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part not in LOG_KINDS:
                raise BatchpilotError(f"--log must be one of {', '.join(LOG_KINDS)} (several allowed), got {part!r}")
            if part not in kinds:
                kinds.append(part)
    return tuple(kinds)


def _finite(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``, or one line saying how to install it."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it, and says so less clearly)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise BatchpilotError("--log tensorboard needs the tensorboard package: pip install 'batchpilot[tensorboard]' "
                              "(or pip install tensorboard)") from None
    return SummaryWriter


class TensorBoardSink:
    """Scalars to TensorBoard event files in ``log_dir`` (the writer opens at the first row, so a resumed run
    can purge what came after its resume step)."""

    def __init__(self, log_dir: str | Path) -> None:
        self.writer_cls = require_tensorboard()
        self.log_dir = Path(log_dir)
        self.writer = None

    def write(self, row: dict) -> None:
        step = int(row["step"])
        if self.writer is None:
            self.writer = self.writer_cls(log_dir=str(self.log_dir), purge_step=step)
        tags = {"train/loss": row.get("loss"), "train/lr": row.get("lr"), "train/batch_size": row.get("batch"),
                "train/samples_per_s": row.get("samples_per_s"), "train/epoch": row.get("epoch"),
                "noise/b_simple": row.get("b_simple"), "noise/b_simple_low": row.get("b_simple_low"),
                "noise/b_simple_high": row.get("b_simple_high")}
        for key, value in row.items():
            if key.startswith("val_"):
                tags[f"val/{key[4:]}"] = value
        for tag, value in tags.items():
            v = _finite(value)
            if v is not None:
                self.writer.add_scalar(tag, v, global_step=step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class CsvSink:
    """Rows to a CSV file with fixed columns."""

    def __init__(self, path: str | Path, columns: Sequence[str]) -> None:
        self.path, self.columns = Path(path), tuple(columns)
        self.fh = None

    def write(self, row: dict) -> None:
        if self.fh is None:
            self._open(int(row["step"]))
        self.writer.writerow(["" if _finite(row.get(c)) is None else row[c] for c in self.columns])

    def _open(self, first_step: int) -> None:
        kept: list[list[str]] = []
        if self.path.exists():  # a resumed run: keep the rows before its first new step
            with open(self.path, newline="") as fh:
                rows = list(csv.reader(fh))
            if rows and tuple(rows[0]) == self.columns:
                kept = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < first_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "w", newline="")
        self.writer = csv.writer(self.fh)
        self.writer.writerow(self.columns)
        self.writer.writerows(kept)

    def flush(self) -> None:
        if self.fh is not None:
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


class JsonlSink:
    """Rows as JSON lines (non-finite values as ``null``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fh = None

    def write(self, row: dict) -> None:
        if self.fh is None:
            step = int(row["step"])
            kept: list[str] = []
            if self.path.exists():
                for line in self.path.read_text(errors="replace").splitlines():
                    try:
                        if int(json.loads(line)["step"]) < step:
                            kept.append(line)
                    except (ValueError, KeyError, TypeError):
                        pass
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.path, "w")
            self.fh.writelines(ln + "\n" for ln in kept)
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()}
        self.fh.write(json.dumps(clean, allow_nan=False) + "\n")

    def flush(self) -> None:
        if self.fh is not None:
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


NoiseSource = Callable[[], "tuple[int, object] | None"]


class StepLogger:
    """The trainer's ``on_step`` hook that feeds every sink one row per step.

    Args:
        sinks: objects with ``write(row)``, ``flush()`` and ``close()``.
        noise: ``noise() -> (steps observed, estimate)`` or ``None`` (no monitor); the estimate has
            ``b_simple``, ``b_simple_low`` and ``b_simple_high``. Read after every step; logged when the step
            count moved, i.e. at every step the noise scale was measured.
        then: another ``on_step`` hook to call after logging.
    """

    def __init__(self, sinks: Sequence, *, noise: NoiseSource | None = None,
                 then: Callable[[dict], None] | None = None) -> None:
        self.sinks, self.noise, self.then = list(sinks), noise, then
        self._prev: tuple[float, float] | None = None  # (samples, wall_s) of the previous step
        self._noise_steps = 0

    def __call__(self, record: dict) -> None:
        row = {k: record.get(k) for k in BASE_COLUMNS if k in record}
        row.update({k: v for k, v in record.items() if k.startswith("val_")})
        samples, wall = record.get("samples"), record.get("wall_s")
        if self._prev is not None and _finite(samples) is not None and _finite(wall) is not None:
            ds, dt = samples - self._prev[0], wall - self._prev[1]
            row["samples_per_s"] = ds / dt if dt > 0 else None
        elif _finite(samples) is not None and _finite(wall) is not None and wall > 0 and record.get("step") == 1:
            row["samples_per_s"] = samples / wall
        if _finite(samples) is not None and _finite(wall) is not None:
            self._prev = (samples, wall)
        if self.noise is not None:
            got = self.noise()
            if got is not None:
                steps, est = got
                if steps > self._noise_steps:
                    self._noise_steps = steps
                    row.update(b_simple=getattr(est, "b_simple", None), b_simple_low=getattr(est, "b_simple_low", None),
                               b_simple_high=getattr(est, "b_simple_high", None), noise_steps=steps)
        for sink in self.sinks:
            sink.write(row)
        if self.then is not None:
            self.then(record)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> "StepLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_sinks(kinds: Sequence[str], log_dir: str | Path, *, metric_columns: Sequence[str] = ()) -> list:
    """The sinks for ``kinds`` writing under ``log_dir`` (TensorBoard events in ``log_dir/tensorboard``)."""
    log_dir = Path(log_dir)
    columns = (*BASE_COLUMNS, *dict.fromkeys(c for c in metric_columns if c.startswith("val_")), *NOISE_COLUMNS)
    sinks: list = []
    for kind in kinds:
        if kind == "tensorboard":
            sinks.append(TensorBoardSink(log_dir / TENSORBOARD_DIR))
        elif kind == "csv":
            sinks.append(CsvSink(log_dir / CSV_NAME, columns))
        elif kind == "jsonl":
            sinks.append(JsonlSink(log_dir / JSONL_NAME))
    return sinks


def trainer_noise(trainer) -> NoiseSource | None:
    """A :data:`NoiseSource` for a trainer's monitor (its DDP rank queue flushed first), or ``None``."""
    if getattr(trainer, "noise", None) is None:
        return None

    def read():
        ranks = getattr(trainer, "rank_noise", None)
        if ranks is not None:
            ranks.flush()
        est = trainer.noise.estimate()  # (finishes the step just taken, so the count below includes it)
        n = trainer.noise.n_updates
        return (n, est) if n >= 1 else None

    return read


__all__ = ["LOG_KINDS", "StepLogger", "make_sinks", "parse_log_kinds", "require_tensorboard", "trainer_noise",
           "TensorBoardSink", "CsvSink", "JsonlSink"]
