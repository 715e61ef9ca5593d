"""The training configuration: a frozen, validated dataclass.

The global batch is ``micro_batch_per_rank x accumulation_steps x world_size``; only the
global batch and the micro-batch are stored, the accumulation steps are derived. A
global batch that does not divide is an error, never silently changed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from batchpilot.scaling.batch_schedules import BatchSchedule
from batchpilot.errors import BatchpilotError
from batchpilot.optim import OPTIMIZERS
from batchpilot.scaling.lr_rules import LR_RULES, default_lr_rule, scale_lr
from batchpilot.scaling.lr_schedules import SCHEDULES
from batchpilot.workloads import Target, Workload

DTYPES = ("float32", "bfloat16", "float64")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BatchpilotError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """How to train a workload.

    Attributes:
        global_batch: samples per optimizer step, over all ranks and micro-batches.
        micro_batch_per_rank: samples per forward/backward on one rank; ``None`` means no accumulation.
        world_size: data-parallel ranks.
        lr: peak LR; ``None`` scales the workload's base LR by ``lr_rule``.
        lr_rule: ``linear``, ``sqrt`` or ``none``; ``None`` picks by optimizer (see :mod:`batchpilot.scaling.lr_rules`).
        warmup_steps: linear warmup length in optimizer steps.
        schedule: ``constant`` or ``cosine``.
        steps: optimizer steps; exclusive with ``epochs``.
        epochs: passes over the training set; exclusive with ``steps``.
        grad_clip: max global gradient norm of the *accumulated* gradient, or ``None``.
        ema_decay: decay of an EMA of the weights, stepped per optimizer step, or ``None``.
        seed: seeds the model init, dropout and the data order.
        eval_every: evaluate every this many optimizer steps (and at the end); ``None`` only at the end.
        checkpoint_every: checkpoint every this many steps (and at the end) when an output dir is given.
        target: stop-free target to record steps/time to, e.g. ``val_acc>=0.85``; defaults to the workload's.
        stop_at_target: end the run once the target is reached.
        dtype: ``float32``, ``bfloat16`` (weights and inputs in bf16) or ``float64`` (tests check exactness in float64).
        diverge_factor: the run is diverged when the loss exceeds this multiple of its first value.
        optimizer: ``default`` (the workload's) or ``sgd``, ``adamw``, ``lars``, ``lamb`` (see :mod:`batchpilot.optim`).
        batch_schedule: a batch-size schedule such as ``linear:end=512,over=200``
            (:mod:`batchpilot.scaling.batch_schedules`); ``global_batch`` is then the reference batch of the LR.
        adaptive: move the batch (up or down) with the measured gradient noise scale (:mod:`batchpilot.train.adaptive`),
            starting at ``global_batch``.
        max_batch: the adaptive controller's largest batch (default ``min(16 x global_batch, N / 2)``).
        min_batch: the adaptive controller's smallest batch (default ``max(2, global_batch // 8)``; at most
            ``global_batch``): it can shrink below its starting batch as well as grow.
        adaptive_estimator: the adaptive controller's noise monitor: ``micro-batch`` (every 4th step, split
            in two; the default, it reached the target sooner in ``bench/adaptive_vs_fixed.py``) or
            ``per-example`` (per-example norms, unsplit steps) (:mod:`batchpilot.train.adaptive`).
        adaptive_throughput: where the adaptive controller's samples/s come from: ``steps`` (the default: a
            step-time model fitted to the run's own steps, :mod:`batchpilot.train.step_times`) or ``probe``
            (every candidate batch timed on a copy of the model at the first decision).
        adaptive_noise_window: the adaptive controller reads the noise scale over the last this many observed
            steps (default 8); ``None``: the monitor's EMAs over all observed steps, which lag early in
            training (:class:`batchpilot.train.adaptive.AdaptiveDriver`, ``noise_window``).
        init_from: start from these weights (a batchpilot checkpoint or a ``state_dict`` file), e.g. to fine-tune.
        sync_batchnorm: convert BatchNorm to SyncBatchNorm, statistics over all ranks (:mod:`batchpilot.train.sync_bn`).
        strategy: ``ddp`` (replicated weights; also the one-process default) or ``fsdp`` (FSDP2
            ``fully_shard``, :mod:`batchpilot.train.fsdp`; needs two ranks or more).
        reshard_after_forward: with ``fsdp``, free each unit's gathered parameters after its forward
            (re-gathered for the backward); ``False`` keeps them until the backward.
        amp: ``bfloat16`` autocast for the forward and the loss, fp32 weights (:mod:`batchpilot.throughput.amp`);
            ``float16`` needs CUDA and a GradScaler, and the trainer runs on the CPU, so it is refused. ``None``: off.
    """

    global_batch: int
    micro_batch_per_rank: int | None = None
    world_size: int = 1
    lr: float | None = None
    lr_rule: str | None = None
    warmup_steps: int = 0
    schedule: str = "constant"
    steps: int | None = None
    epochs: float | None = None
    grad_clip: float | None = None
    ema_decay: float | None = None
    seed: int = 0
    eval_every: int | None = None
    checkpoint_every: int | None = None
    target: str | None = None
    stop_at_target: bool = False
    dtype: str = "float32"
    diverge_factor: float = 10.0
    optimizer: str = "default"
    batch_schedule: str | None = None
    adaptive: bool = False
    max_batch: int | None = None
    min_batch: int | None = None
    adaptive_estimator: str = "micro-batch"
    adaptive_throughput: str = "steps"
    adaptive_noise_window: int | None = 8
    init_from: str | None = None
    sync_batchnorm: bool = False
    strategy: str = "ddp"
    reshard_after_forward: bool = True
    amp: str | None = None

    def __post_init__(self) -> None:
        _positive_int("batch", self.global_batch)
        _positive_int("world size", self.world_size)
        if self.micro_batch_per_rank is not None:
            _positive_int("micro-batch", self.micro_batch_per_rank)
        per_rank, rem = divmod(self.global_batch, self.world_size)
        if rem:
            raise BatchpilotError(f"batch {self.global_batch} does not divide over world size {self.world_size}")
        if per_rank % self.micro_per_rank:
            raise BatchpilotError(
                f"micro-batch {self.micro_per_rank} does not divide the per-rank batch {per_rank} "
                f"(batch {self.global_batch} / world {self.world_size}); pick a divisor, the global batch is never changed"
            )
        if self.lr is not None and not (self.lr >= 0 and math.isfinite(self.lr)):
            raise BatchpilotError(f"lr must be a finite number >= 0, got {self.lr!r}")
        if self.lr_rule is not None and self.lr_rule not in LR_RULES:
            raise BatchpilotError(f"lr rule must be one of {', '.join(LR_RULES)}, got {self.lr_rule!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise BatchpilotError(f"warmup steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.schedule not in SCHEDULES:
            raise BatchpilotError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.steps is not None and self.epochs is not None:
            raise BatchpilotError("give either steps or epochs, not both")
        if self.steps is not None:
            _positive_int("steps", self.steps)
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise BatchpilotError(f"epochs must be > 0, got {self.epochs!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise BatchpilotError(f"grad clip must be > 0, got {self.grad_clip!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise BatchpilotError(f"EMA decay must be in (0, 1), got {self.ema_decay!r}")
        for name in ("eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name.replace("_", " "), value)
        if self.target is not None:
            Target.parse(self.target)
        if self.dtype not in DTYPES:
            raise BatchpilotError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.amp is not None:
            from batchpilot.throughput.amp import amp_policy

            if self.amp not in ("bfloat16", "float16"):
                raise BatchpilotError(f"amp must be bfloat16, float16 or None, got {self.amp!r}")
            if self.dtype != "float32":
                raise BatchpilotError(f"--amp keeps fp32 weights and autocasts the forward: it needs dtype float32, "
                                      f"got {self.dtype!r}")
            amp_policy(self.amp, "cpu")  # the trainer runs on the CPU: fp16 is refused with the way out
        if not self.diverge_factor > 1:
            raise BatchpilotError(f"diverge factor must be > 1, got {self.diverge_factor!r}")
        self._check_batching()

    def _check_batching(self) -> None:
        if not isinstance(self.sync_batchnorm, bool):
            raise BatchpilotError(f"sync_batchnorm must be True or False, got {self.sync_batchnorm!r}")
        if self.optimizer not in OPTIMIZERS:
            raise BatchpilotError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.batch_schedule is not None and self.adaptive:
            raise BatchpilotError("give either a batch schedule or adaptive batching, not both")
        if self.batch_schedule is not None:
            BatchSchedule.parse(self.batch_schedule)
        if self.max_batch is not None:
            _positive_int("max batch", self.max_batch)
            if not self.adaptive:
                raise BatchpilotError("max batch applies to adaptive batching only (add adaptive=True / --adaptive)")
            if self.max_batch < self.global_batch:
                raise BatchpilotError(f"max batch {self.max_batch} is below the starting batch {self.global_batch}")
        if self.min_batch is not None:
            _positive_int("min batch", self.min_batch)
            if not self.adaptive:
                raise BatchpilotError("min batch applies to adaptive batching only (add adaptive=True / --adaptive)")
            if self.min_batch > self.global_batch:
                raise BatchpilotError(f"min batch {self.min_batch} is above the starting batch {self.global_batch}")
        if self.adaptive_estimator not in ("per-example", "micro-batch"):
            raise BatchpilotError(f"adaptive estimator must be per-example or micro-batch, got {self.adaptive_estimator!r}")
        if self.adaptive_throughput not in ("steps", "probe"):
            raise BatchpilotError(f"adaptive throughput must be steps or probe, got {self.adaptive_throughput!r}")
        w = self.adaptive_noise_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 2):
            raise BatchpilotError(f"adaptive noise window must be an integer >= 2 (observed steps) or None, got {w!r}")
        if (self.batch_schedule is not None or self.adaptive) and self.world_size != 1:
            raise BatchpilotError("batch schedules and adaptive batching run on one process for now (world size 1)")
        self._check_strategy()

    def _check_strategy(self) -> None:
        from batchpilot.train.fsdp import STRATEGIES, check_fsdp_options

        if self.strategy not in STRATEGIES:
            raise BatchpilotError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if not isinstance(self.reshard_after_forward, bool):
            raise BatchpilotError(f"reshard_after_forward must be True or False, got {self.reshard_after_forward!r}")
        if self.strategy == "fsdp":
            check_fsdp_options(world_size=self.world_size, ema=self.ema_decay is not None,
                               sync_batchnorm=self.sync_batchnorm)
        elif not self.reshard_after_forward:
            raise BatchpilotError("--no-reshard-after-forward applies to --strategy fsdp only")

    @property
    def variable_batch(self) -> bool:
        """Whether the batch changes during the run (a schedule or the adaptive controller)."""
        return self.batch_schedule is not None or self.adaptive

    @property
    def micro_per_rank(self) -> int:
        """The micro-batch per rank (the per-rank batch when no micro-batch was given)."""
        return self.micro_batch_per_rank or self.global_batch // self.world_size

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each rank: global / (micro x world)."""
        return self.global_batch // (self.micro_per_rank * self.world_size)

    def total_steps(self, num_samples: int) -> int:
        """Optimizer steps in the run: ``steps``, or ``epochs`` x ceil(N / B) (1 epoch by default)."""
        if self.steps is not None:
            return self.steps
        steps_per_epoch = math.ceil(num_samples / self.global_batch)
        return max(1, round((self.epochs or 1.0) * steps_per_epoch))

    def resolve_lr(self, workload: Workload) -> tuple[float, str]:
        """The peak LR and the rule that produced it (``explicit`` when ``lr`` was given)."""
        if self.lr is not None:
            return self.lr, "explicit"
        rule = self.lr_rule or default_lr_rule(workload.optimizer_family())
        return scale_lr(workload.base_lr, workload.base_batch, self.global_batch, rule), rule

    def resolve_target(self, workload: Workload) -> Target | None:
        """The target to record: the config's, else the workload's."""
        return Target.parse(self.target) if self.target else workload.target

    def to_dict(self) -> dict:
        """Plain data (for checkpoints and JSON)."""
        return asdict(self)
