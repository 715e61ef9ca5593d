"""The plan: plain data, rendered elsewhere (terminal table, plan.json, report.html)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from batchpilot.errors import BatchpilotError
from batchpilot.files import atomic_write_json
from batchpilot.plan.schema import SCHEMA_VERSION, validate_plan

PLAN_VERSION = 1


@dataclass(frozen=True)
class Plan:
    """The chosen configuration, its predictions, and the measurements behind them.

    The first block is what ``batchpilot train --plan`` runs. ``threads`` is the CPU thread count the
    measurements ran with (``thread_choice``: samples/s measured per candidate count, when chosen). ``noise_scale`` is B_noise in samples;
    ``efficiency`` and ``goodput`` follow Pollux (Qiao et al. 2021) relative to ``base_batch``.
    """

    workload: str
    micro_batch_per_rank: int
    accumulation_steps: int
    world_size: int
    global_batch: int
    lr: float
    lr_rule: str
    warmup_steps: int
    schedule: str
    noise_scale: float
    noise_scale_low: float
    noise_scale_high: float
    samples_per_s: float
    efficiency: float
    goodput: float
    peak_bytes: float
    max_micro_batch: int
    caveats: tuple[str, ...]
    base_batch: int
    base_lr: float
    device: str
    usable_bytes: int
    target: str | None
    predicted_steps_to_target: int | None
    predicted_time_to_target_s: float | None
    lr_rule_note: str
    noise_note: str
    why: str
    threads: int
    thread_choice: dict[str, float] = field(default_factory=dict)
    alternatives: dict[str, dict] = field(default_factory=dict)
    candidates: tuple[dict, ...] = ()
    throughput: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    noise_probe: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    worlds: dict = field(default_factory=dict)
    """Across world sizes (``plan --world-size 1,2,4,8``; :mod:`.worlds`): the all-reduce model, the best split
    and goodput at each size, the recommended size, and how the chosen global batch splits at other sizes."""
    version: int = PLAN_VERSION
    workload_spec: dict = field(default_factory=dict)
    """How to rebuild the workload (:mod:`.workload_spec`): its name or ``file.py:fn`` / ``pkg.module:fn``, options."""
    schema_version: int = SCHEMA_VERSION
    """The plan.json layout (:mod:`.schema`)."""
    noise: dict = field(default_factory=dict)
    """The noise scale the plan used and how it was obtained (:mod:`.noise_trend`, :mod:`.confirm`): the
    probe's effective B_simple, its trend against the loss, the loss at the target and how far it was
    extrapolated, the confirmation runs' B_crit when ``--confirm`` ran, and ``b_used``."""
    lr_check: dict = field(default_factory=dict)
    """The base-LR check (:mod:`.lr_check`): multipliers tried, their late losses, the adopted base LR."""
    goodput_band: tuple[float, float] = (0.0, 0.0)
    """The chosen candidate's goodput range from the timing uncertainty (interleaved rounds)."""
    tied_batches: tuple[int, ...] = ()
    """Global batches whose goodput was within the measured uncertainty of the best (the tie the choice broke)."""
    probe_cost_s: float = 0.0
    """Wall-clock seconds of all the training the plan ran (LR check, noise probe, confirmation)."""
    goodput_band_source: str = ""
    """What ``goodput_band`` (and each candidate's) covers: ``measured: timing rounds``, or ``PREDICTED step time:
    ...`` (the step-time band of :mod:`batchpilot.throughput.band` for a GPU that is not here)."""
    amp: str | None = None
    """Autocast type (``bfloat16``/``float16``) the plan was made for and ``train --plan`` trains with; ``None``: fp32."""
    tokens_per_sample: int | None = None
    """Tokens per sample when the loss unit is the token (``tokens/s = samples/s x tokens_per_sample``)."""
    memory_only: bool = False
    """Planned from traced memory and a predicted or measured step time alone (``hf:gpt2`` at full size):
    ``train --plan`` refuses it."""
    skipped: dict = field(default_factory=dict)
    """Stages not run (``lr_check``, ``noise_probe``, ``confirm``) and why."""

    def __post_init__(self) -> None:
        if self.global_batch != self.micro_batch_per_rank * self.accumulation_steps * self.world_size:
            raise BatchpilotError("plan: global_batch must equal micro_batch_per_rank x accumulation_steps x world_size")
        if self.amp is not None and self.amp not in ("bfloat16", "float16"):
            raise BatchpilotError(f"plan: amp must be bfloat16, float16 or None, got {self.amp!r}")
        if self.tokens_per_sample is not None and (isinstance(self.tokens_per_sample, bool)
                                                   or not isinstance(self.tokens_per_sample, int)
                                                   or self.tokens_per_sample < 1):
            raise BatchpilotError(f"plan: tokens_per_sample must be a positive integer or None, got "
                                  f"{self.tokens_per_sample!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (non-finite floats become ``None``)."""
        return _clean(asdict(self))


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_plan(plan: Plan, path: str | Path) -> Path:
    """Write ``plan.json`` (strict JSON, atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, plan.to_dict())
    return path


REQUIRED_KEYS = ("micro_batch_per_rank", "accumulation_steps", "world_size", "global_batch", "lr", "lr_rule",
                 "warmup_steps")
MAX_PLAN_BYTES = 64 * 2**20


def read_plan(path: str | Path) -> dict[str, Any]:
    """Read and check a ``plan.json`` against :mod:`batchpilot.plan.schema` (types, ranges, batch arithmetic).

    Raises:
        BatchpilotError: a missing/unreadable file, missing keys, a field of the wrong type or range,
            or an inconsistent batch split (one line naming the field and value).
    """
    if not str(path).strip():  # Path("") is the current directory
        raise BatchpilotError(f"--plan must name a plan.json file, got {str(path)!r}")
    path = Path(path)
    source = f"plan file {str(path)!r}"
    if path.is_dir():
        raise BatchpilotError(f"{source} is a directory; expected the plan.json inside it")
    try:
        if path.stat().st_size > MAX_PLAN_BYTES:
            raise BatchpilotError(f"{source} is larger than {MAX_PLAN_BYTES // 2**20} MiB; expected a plan.json")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BatchpilotError(f"{source} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, BatchpilotError):
            raise
        reason = " ".join(str(exc).split())[:200]
        raise BatchpilotError(f"{source} is not readable JSON: {reason}") from None
    return validate_plan(data, source)
