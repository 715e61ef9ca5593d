"""Hugging Face integration: ``TrainingArguments`` and accelerate configs from a plan, and a callback.

* :func:`plan_to_training_arguments` turns a ``batchpilot plan`` into ``TrainingArguments``
  (``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``learning_rate``,
  ``warmup_steps``) and checks that ``per-device batch x accumulation x world size`` is the plan's
  global batch in the process that will train; ``auto_find_batch_size`` is refused.
* :func:`plan_to_accelerate_config` / :func:`write_accelerate_config` give the launch config for
  ``accelerate launch --config_file``; :func:`plan_to_accelerator_kwargs` the ``Accelerator(...)``
  arguments.
* :class:`BatchpilotCallback` (a ``TrainerCallback``) runs the doctor at train start, refuses
  ``auto_find_batch_size`` and arguments that contradict the plan, detects a loss that is not
  normalised for accumulation, and measures the gradient noise scale B_simple (McCandlish et al.
  2018) from the micro-batches of gradient accumulation. :func:`attach` adds it ahead of the
  reporting callbacks.

The pieces live in :mod:`batchpilot.integrations.hf_args` and
:mod:`batchpilot.integrations.hf_callback`; ``docs/integrations/hf.md`` is the user guide.
"""

from batchpilot.integrations.hf_args import (AUTO_FIND_BATCH_SIZE, check_training_arguments, global_batch_of,
                                             plan_to_accelerate_config, plan_to_accelerator_kwargs,
                                             plan_to_training_arguments, write_accelerate_config)
from batchpilot.integrations.hf_callback import BatchpilotCallback, attach, ignores_num_items

__all__ = [
    "AUTO_FIND_BATCH_SIZE", "BatchpilotCallback", "attach", "check_training_arguments", "global_batch_of",
    "ignores_num_items", "plan_to_accelerate_config", "plan_to_accelerator_kwargs", "plan_to_training_arguments",
    "write_accelerate_config",
]
