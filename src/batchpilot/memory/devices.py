"""Target devices: a table of common GPUs, explicit sizes, and the usable share of memory.

``usable_bytes`` is what the training step's tensors may occupy, i.e. what
``torch.cuda.max_memory_allocated`` may reach:

    usable = (total - cuda_context - workspaces) * (1 - margin)

* ``total``: the board's memory as ``nvidia-smi --query-gpu=memory.total`` reports it
  (the MiB figures below), or ``torch.cuda.mem_get_info`` for ``"cuda"``.
* ``cuda_context`` (default 512 MiB): the CUDA context, kernel images and the
  cuBLAS/cuDNN handles live outside PyTorch's allocator. With lazy module loading
  (CUDA >= 11.7, PyTorch's default) it is a few hundred MiB; 512 MiB covers the
  cases we know of.
* ``workspaces`` (default 64 MiB): cuBLAS workspaces (PyTorch's default config is
  ``:4096:8`` = 32 MiB on Hopper) and cuDNN conv workspaces, which the caching
  allocator holds in *reserved* memory.
* ``margin`` (default 10%): the caching allocator rounds requests to 512 B and
  carves 2 MiB/20 MiB segments that fragment, so reserved memory exceeds
  allocated memory by a few to ~10%. The source documents' "use 80% of memory"
  is a coarser version of the same idea; we subtract the known overheads first and
  keep 10% for fragmentation. All three are fields of :class:`DeviceSpec`.

For a CPU target, usable memory is ``cpu_share`` (80%) of the RAM that is available
now (``MemAvailable`` in ``/proc/meminfo``), with no context or workspaces.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from batchpilot.errors import BatchpilotError
from batchpilot.memory.units import format_bytes, parse_bytes

MiB = 2**20
DEFAULT_CONTEXT_BYTES = 512 * MiB
DEFAULT_WORKSPACE_BYTES = 64 * MiB
DEFAULT_MARGIN_FRAC = 0.10
CPU_SHARE = 0.80

# name -> total MiB as nvidia-smi reports it for the common board of that name.
GPU_TABLE_MIB: dict[str, int] = {
    "B200": 183359,
    "H200": 143771,
    "H100": 81559,
    "H100-PCIE": 81559,
    "GH200": 97871,
    "A100-80GB": 81920,
    "A100-40GB": 40960,
    "L40S": 46068,
    "L40": 46068,
    "A40": 46068,
    "RTX 6000 ADA": 49140,
    "RTX A6000": 49140,
    "A10G": 23028,
    "A10": 23028,
    "L4": 23034,
    "RTX 4090": 24564,
    "RTX 4080": 16376,
    "RTX 3090": 24576,
    "RTX 3080": 10240,
    "V100-32GB": 32768,
    "V100-16GB": 16384,
    "T4": 15360,
}
_ALIASES = {"A100": "A100-80GB", "V100": "V100-16GB", "H100-SXM": "H100", "H100-80GB": "H100"}


@dataclass(frozen=True)
class DeviceSpec:
    """A target device and how much of its memory a training step may use.

    Attributes:
        name: table name, ``"cpu"``, ``"cuda:0 (<gpu name>)"`` or ``"24.00 GiB GPU"``.
        memory_bytes: total memory.
        usable_bytes: the budget for the step's tensors after overheads and the margin.
        kind: ``"cuda"`` or ``"cpu"``; selects the tracing target (allocator rounding, attention kernel).
        context_bytes: CUDA context and library handles (outside the allocator).
        workspace_bytes: cuBLAS/cuDNN workspaces (inside the allocator, not the step's tensors).
        margin_frac: share kept free for allocator fragmentation.
    """

    name: str
    memory_bytes: int
    usable_bytes: int
    kind: str = "cuda"
    context_bytes: int = 0
    workspace_bytes: int = 0
    margin_frac: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("cuda", "cpu"):
            raise BatchpilotError(f"device kind must be 'cuda' or 'cpu', got {self.kind!r}")
        if not isinstance(self.memory_bytes, int) or self.memory_bytes < 1:
            raise BatchpilotError(f"device memory_bytes must be a positive integer, got {self.memory_bytes!r}")
        if not isinstance(self.usable_bytes, int) or not 0 <= self.usable_bytes <= self.memory_bytes:
            raise BatchpilotError(
                f"device usable_bytes must be in [0, memory_bytes={self.memory_bytes}], got {self.usable_bytes!r}")
        if not 0 <= self.margin_frac < 1:
            raise BatchpilotError(f"device margin_frac must be in [0, 1), got {self.margin_frac!r}")

    @classmethod
    def gpu(cls, name: str, memory_bytes: int, *, context_bytes: int = DEFAULT_CONTEXT_BYTES,
            workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, margin_frac: float = DEFAULT_MARGIN_FRAC) -> "DeviceSpec":
        """A GPU of ``memory_bytes`` total with the documented overheads subtracted."""
        free = memory_bytes - context_bytes - workspace_bytes
        usable = max(0, int(free * (1 - margin_frac)))
        return cls(name, memory_bytes, usable, "cuda", context_bytes, workspace_bytes, margin_frac)

    def describe(self) -> str:
        """One line: name, total and usable memory."""
        return f"{self.name}: {format_bytes(self.memory_bytes)} total, {format_bytes(self.usable_bytes)} usable"


def known_devices() -> list[str]:
    """Names accepted by :func:`resolve_device` (besides sizes)."""
    return ["cpu", "cuda", *GPU_TABLE_MIB, *_ALIASES]


def _normalise(name: str) -> str:
    return re.sub(r"[\s_]+", " ", name.strip().upper()).replace("NVIDIA ", "").replace("GEFORCE ", "")


def _lookup(name: str) -> str | None:
    key = _normalise(name)
    table = {_normalise(k): k for k in GPU_TABLE_MIB}
    table.update({_normalise(k): v for k, v in _ALIASES.items()})
    if key in table:
        return table[key]
    dashed = key.replace(" ", "-")
    for k, v in table.items():
        if k.replace(" ", "-") == dashed:
            return v
    return None


def _cpu_available_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _current_cuda() -> DeviceSpec:
    import torch

    if not torch.cuda.is_available():
        raise BatchpilotError("device 'cuda' asked for, but no CUDA device is visible; name a GPU "
                              "(e.g. --device H100) or give --memory 24GiB to plan for one")
    idx = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    return DeviceSpec.gpu(f"cuda:{idx} ({props.name})", int(props.total_memory))


def resolve_device(device: str | None = None, memory: str | int | None = None) -> DeviceSpec:
    """The :class:`DeviceSpec` for a device name and/or a memory size.

    Args:
        device: ``"cpu"`` (this machine's RAM), ``"cuda"`` (the current GPU), a GPU name from
            the table (``"H100"``, ``"A100-40GB"``, ``"RTX 4090"`` ...), or a size such as
            ``"24GiB"`` (a GPU of that total). ``None`` means ``"cpu"`` unless ``memory`` is given.
        memory: a total memory size (``"24GiB"``, bytes as int) that overrides the table's;
            with no ``device`` it describes a GPU of that size.

    Raises:
        BatchpilotError: an unknown device name (the known ones are listed) or a bad size.
    """
    total = parse_bytes(memory) if memory is not None else None
    if device is not None and not str(device).strip():
        raise BatchpilotError(f"device must be cpu, cuda, a GPU name (e.g. H100) or a size (e.g. 24GiB), got {device!r}")
    name = (device or "").strip()
    if not name:
        if total is None:
            name = "cpu"
        else:
            return DeviceSpec.gpu(f"{format_bytes(total)} GPU", total)
    low = name.lower()
    if low == "cpu":
        if total is not None:
            return DeviceSpec("cpu", total, int(total * CPU_SHARE), "cpu", margin_frac=1 - CPU_SHARE)
        avail = _cpu_available_bytes()
        return DeviceSpec("cpu", avail, int(avail * CPU_SHARE), "cpu", margin_frac=1 - CPU_SHARE)
    if low == "cuda" or low.startswith("cuda:"):
        spec = _current_cuda()
        return DeviceSpec.gpu(spec.name, total) if total is not None else spec
    key = _lookup(name)
    if key is None:
        if name[0].isdigit():
            size = parse_bytes(name)
            return DeviceSpec.gpu(f"{format_bytes(size)} GPU", total if total is not None else size)
        raise BatchpilotError(f"unknown device {device!r}; known: {', '.join(known_devices())} (or a size like 24GiB)")
    return DeviceSpec.gpu(key, total if total is not None else GPU_TABLE_MIB[key] * MiB)
