"""Plan -> Hugging Face ``TrainingArguments`` and accelerate configs, and the global-batch checks.

Why ``auto_find_batch_size`` is refused: after an out-of-memory error the Trainer halves
``per_device_train_batch_size`` and keeps ``gradient_accumulation_steps``, so the global batch -
and the batch the LR was scaled for - halves without a word. Choose the micro-batch from the
plan's memory model instead, and trade micro-batch for accumulation explicitly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

try:
    from transformers import TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("batchpilot.integrations.hf needs transformers: pip install 'batchpilot[hf]'") from exc

import yaml

from batchpilot.errors import BatchpilotError
from batchpilot.files import atomic_write_text
from batchpilot.integrations.plan import load_plan

AUTO_FIND_BATCH_SIZE = (
    "auto_find_batch_size=True is refused: after an out-of-memory error the Trainer halves "
    "per_device_train_batch_size but keeps gradient_accumulation_steps, so the global batch (and the batch "
    "the LR was scaled for) changes silently; take the micro-batch from `batchpilot plan` and, if it does not "
    "fit, lower per_device_train_batch_size and raise gradient_accumulation_steps together")


# -- plan -> TrainingArguments ---------------------------------------------------------------
def global_batch_of(args: TrainingArguments) -> int:
    """Samples per optimizer step: ``train_batch_size x gradient_accumulation_steps x world_size``.

    ``train_batch_size`` is the per-device batch times the GPUs of ``nn.DataParallel``, if any.
    """
    return int(args.train_batch_size) * int(args.gradient_accumulation_steps) * int(args.world_size)


def check_training_arguments(args: TrainingArguments, plan: Any = None) -> int:
    """Refuse ``auto_find_batch_size`` and, given a plan, any batch, accumulation, LR or warmup off it.

    Args:
        args: the arguments the Trainer will run with (in the process that trains).
        plan: a plan (see :func:`batchpilot.integrations.plan.load_plan`), or ``None``.

    Returns:
        The global batch.

    Raises:
        BatchpilotError: ``auto_find_batch_size`` is set, or the arguments do not match the plan.
    """
    if getattr(args, "auto_find_batch_size", False):
        raise BatchpilotError(AUTO_FIND_BATCH_SIZE)
    global_batch = global_batch_of(args)
    if plan is None:
        return global_batch
    p = load_plan(plan)
    if int(args.world_size) != p.world_size:
        raise BatchpilotError(
            f"the plan is for world_size {p.world_size} but this process sees {args.world_size} "
            f"(launch with `torchrun --nproc-per-node {p.world_size}` or `accelerate launch --num_processes {p.world_size}`, "
            "or pass check_world_size=False to build the arguments outside the launched job)")
    if int(args.train_batch_size) != p.micro_batch_per_rank:
        raise BatchpilotError(
            f"the Trainer would put {args.train_batch_size} samples per process per micro-batch "
            f"(per_device_train_batch_size {args.per_device_train_batch_size} x {max(1, args.n_gpu)} DataParallel GPU(s)), "
            f"the plan {p.micro_batch_per_rank}: run one process per device (torchrun) instead of DataParallel")
    if int(args.gradient_accumulation_steps) != p.accumulation_steps:
        raise BatchpilotError(f"gradient_accumulation_steps is {args.gradient_accumulation_steps}, "
                              f"the plan's accumulation_steps {p.accumulation_steps}")
    if not math.isclose(float(args.learning_rate), p.lr, rel_tol=1e-9):
        raise BatchpilotError(f"learning_rate is {args.learning_rate:g}, the plan's lr {p.lr:g}")
    warmup = float(args.warmup_steps)
    if warmup != p.warmup_steps and not (p.warmup_steps == 0 and warmup == 0):
        raise BatchpilotError(f"warmup_steps is {args.warmup_steps:g}, the plan's warmup_steps {p.warmup_steps}")
    if global_batch != p.global_batch:  # pragma: no cover - implied by the checks above
        raise BatchpilotError(f"the global batch is {global_batch}, the plan's {p.global_batch}")
    return global_batch


def plan_to_training_arguments(plan: Any, *, check_world_size: bool = True, **kwargs: Any) -> TrainingArguments:
    """``TrainingArguments`` that train at the plan's batch, accumulation, LR and warmup.

    Args:
        plan: a ``plan.json`` path, its dict, or a plan object.
        check_world_size: verify, in this process, that per-device batch x accumulation x world
            size is the plan's global batch (turn off to build arguments outside the launched job).
        **kwargs: any other ``TrainingArguments`` field (``output_dir``, ``max_steps``, ...).

    Returns:
        The arguments.

    Raises:
        BatchpilotError: ``auto_find_batch_size=True``, a keyword that contradicts the plan, or a
            world size that does not match it.
    """
    p = load_plan(plan)
    if kwargs.get("auto_find_batch_size"):
        raise BatchpilotError(AUTO_FIND_BATCH_SIZE)
    values = {"per_device_train_batch_size": p.micro_batch_per_rank, "gradient_accumulation_steps": p.accumulation_steps,
              "learning_rate": p.lr, "warmup_steps": p.warmup_steps}
    for key, value in values.items():
        if key in kwargs and kwargs[key] != value:
            raise BatchpilotError(f"{key}={kwargs[key]!r} contradicts the plan's {value!r}; leave it out (the plan sets it)")
    if kwargs.get("warmup_ratio"):
        raise BatchpilotError(f"warmup_ratio={kwargs['warmup_ratio']!r} contradicts the plan's warmup_steps {p.warmup_steps}")
    args = TrainingArguments(**{**kwargs, **values})
    if check_world_size:
        check_training_arguments(args, p)
    return args


# -- plan -> accelerate ----------------------------------------------------------------------
def plan_to_accelerate_config(plan: Any, *, distributed_type: str | None = None, num_machines: int = 1,
                              mixed_precision: str = "no", use_cpu: bool = False) -> dict[str, Any]:
    """The ``accelerate launch --config_file`` settings for the plan's world size.

    accelerate's config file holds the launch (processes, machines, precision); the batch and the
    LR belong to the training script (see :func:`plan_to_accelerator_kwargs`).

    Args:
        plan: the plan.
        distributed_type: accelerate's ``distributed_type`` for more than one process
            (default ``MULTI_GPU``, or ``MULTI_CPU`` with ``use_cpu``); ``NO`` is used for one.
        num_machines: machines the ``world_size`` processes are spread over (must divide it).
        mixed_precision: ``no``, ``fp16``, ``bf16`` or ``fp8``.
        use_cpu: train on CPU.
    """
    p = load_plan(plan)
    if isinstance(num_machines, bool) or not isinstance(num_machines, int) or num_machines < 1 or p.world_size % num_machines:
        raise BatchpilotError(f"num_machines must be a positive divisor of the plan's world_size {p.world_size}, got {num_machines!r}")
    if mixed_precision not in ("no", "fp16", "bf16", "fp8"):
        raise BatchpilotError(f"mixed_precision must be no, fp16, bf16 or fp8, got {mixed_precision!r}")
    if p.world_size == 1:
        dist = "NO"
    else:
        dist = distributed_type or ("MULTI_CPU" if use_cpu else "MULTI_GPU")
    return {
        "compute_environment": "LOCAL_MACHINE", "distributed_type": dist, "num_processes": p.world_size,
        "num_machines": num_machines, "machine_rank": 0, "mixed_precision": mixed_precision, "use_cpu": use_cpu,
        "main_training_function": "main", "rdzv_backend": "static", "same_network": True, "debug": False,
    }


def write_accelerate_config(plan: Any, path: str | Path, **kwargs: Any) -> Path:
    """Write :func:`plan_to_accelerate_config` as YAML to ``path``; returns the path."""
    path = Path(path)
    atomic_write_text(path, yaml.safe_dump(plan_to_accelerate_config(plan, **kwargs), sort_keys=True))
    return path


def plan_to_accelerator_kwargs(plan: Any) -> dict[str, Any]:
    """Keyword arguments for ``accelerate.Accelerator`` (the accumulation; batch and LR go to your loader/optimizer)."""
    return {"gradient_accumulation_steps": load_plan(plan).accumulation_steps}


