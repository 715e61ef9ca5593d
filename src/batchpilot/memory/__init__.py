"""Memory: predict the peak training-step memory M(B) and the largest micro-batch on any device.

* :func:`memory_curve` traces a full step (forward, backward, optimizer step with state
  creation, and a steady-state step) with fake tensors and fits ``M(B)``.
* :func:`resolve_device` / :class:`DeviceSpec`: a GPU table, explicit sizes, usable memory.
* :func:`find_max_batch`: an out-of-memory-safe probe on a real device.
"""

from batchpilot.memory import hf as _hf  # noqa: F401  (registers hf:gpt2, hf:bert-base, hf:bert-large)
from batchpilot.memory.api import memory_curve, with_seq_len
from batchpilot.memory.curve import MemoryCurve
from batchpilot.memory.devices import DeviceSpec, known_devices, resolve_device
from batchpilot.memory.probe import ProbeResult, Trial, find_max_batch, is_oom, probe_workload
from batchpilot.memory.snapshot import TrainingState
from batchpilot.memory.units import format_bytes, parse_bytes

__all__ = ["MemoryCurve", "memory_curve", "with_seq_len", "DeviceSpec", "resolve_device", "known_devices",
           "parse_bytes", "format_bytes", "find_max_batch", "probe_workload", "ProbeResult", "Trial",
           "is_oom", "TrainingState"]
