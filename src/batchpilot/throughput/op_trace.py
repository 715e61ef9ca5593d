"""The op trace behind the step-time prediction: every kernel-launching aten op of one training step on
fake tensors, with its FLOPs (``torch.utils.flop_counter``'s formulas), bytes moved, launches, compute
class and phase (:func:`trace_ops`). :mod:`batchpilot.throughput.predict` prices it on a device.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from batchpilot.workloads import Workload


_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
              "_unsafe_view", "lift_fresh", "lift_fresh_copy", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
              "is_same_size", "_has_compatible_shallow_copy_type", "_local_scalar_dense", "set_", "resize_",
              "_reshape_alias", "view", "reshape", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
              "slice", "select", "as_strided", "split", "split_with_sizes", "chunk", "unbind", "_to_copy_noop",
              "prim::device", "record_stream", "copy_noop"}
_ATTENTION = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
              "_flash_attention_forward", "_efficient_attention_forward"}
_ATTENTION_BWD = {n + "_backward" for n in _ATTENTION} | {"_flash_attention_backward", "_efficient_attention_backward"}
_FOREACH_TENSORS_PER_LAUNCH = 24
"""A ``_foreach_*`` op launches about one kernel per this many tensors (multi_tensor_apply's chunking)."""



@dataclass
class OpTrace:
    """Every kernel-launching op of one traced training step (the second of two), in order.

    Arrays are per op: ``flops``, ``bytes``, ``launches``, ``compute`` (``fp32``/``tf32``/``half``/``none``),
    ``causal`` (attention kernels with a causal mask), ``phase`` (``micro`` = forward + backward, ``optimizer``).
    """

    batch: int
    names: list[str] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    bytes: list[float] = field(default_factory=list)
    launches: list[int] = field(default_factory=list)
    compute: list[str] = field(default_factory=list)
    causal: list[bool] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def total_flops(self, phase: str = "micro") -> float:
        return float(sum(f for f, p in zip(self.flops, self.phase) if p == phase))


def _flop_functions() -> dict[str, Any]:
    from torch.utils.flop_counter import flop_registry

    by_name = {getattr(k, "__name__", str(k)): v for k, v in flop_registry.items()}
    aten = torch.ops.aten
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        # the CPU flash kernel a CUDA-target trace runs (memory/options.py): the flash kernel's formulas
        by_name["_scaled_dot_product_flash_attention_for_cpu"] = flop_registry[aten._scaled_dot_product_flash_attention]
        by_name["_scaled_dot_product_flash_attention_for_cpu_backward"] = \
            flop_registry[aten._scaled_dot_product_flash_attention_backward]
    return by_name


def _tensors(obj: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _is_causal(name: str, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("is_causal"):
        return True
    if name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        return len(args) > 4 and bool(args[4])
    if name == "_scaled_dot_product_flash_attention_for_cpu_backward" or name == "_scaled_dot_product_flash_attention_backward":
        return any(isinstance(a, bool) and a for a in args[6:9])
    return False


def _compute_class(name: str, tensors: list[torch.Tensor]) -> str:
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    if dtype in (torch.bfloat16, torch.float16):
        return "half"
    return "tf32" if "convolution" in name else "fp32"


def trace_ops(workload: Workload, batch: int, *, target: str = "cuda", dtype: str = "float32", amp: bool = False,
              checkpointing: bool = False) -> OpTrace:
    """Run two training steps at ``batch`` on fake tensors and record the second one's ops (see the module doc)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from batchpilot.memory.options import autocast_context, build_step_objects, cuda_attention
    from batchpilot.memory.trace import step_input_shapes
    from batchpilot.workloads.common import preserved_host_rng

    flop_fns = _flop_functions()
    trace = OpTrace(batch=batch)
    state = {"record": False, "phase": "micro"}

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if not state["record"]:
                return out
            name = func.overloadpacket.__name__
            if name in _NO_KERNEL or getattr(func, "is_view", False):
                return out
            ins = _tensors((args, kwargs))
            outs = _tensors(out)
            seen: set[int] = set()
            nbytes = 0
            for t in ins + outs:
                if id(t) not in seen:
                    seen.add(id(t))
                    nbytes += t.numel() * t.element_size()
            fn = flop_fns.get(name)
            flops = 0.0
            if fn is not None:
                try:
                    flops = float(fn(*args, **kwargs, out_val=out))
                except Exception:  # noqa: BLE001 - an unusual signature counts as memory-bound
                    flops = 0.0
            launches = 1
            if name.startswith("_foreach_"):
                launches = max(1, math.ceil(len(ins) / _FOREACH_TENSORS_PER_LAUNCH))
            trace.names.append(name)
            trace.flops.append(flops)
            trace.bytes.append(float(nbytes))
            trace.launches.append(launches)
            trace.compute.append(_compute_class(name, ins) if flops else "none")
            trace.causal.append((name in _ATTENTION or name in _ATTENTION_BWD) and _is_causal(name, args, kwargs))
            trace.phase.append(state["phase"])
            return out

    param_dtype, x_shape, x_dtype, y_shape, y_dtype = step_input_shapes(workload, target, dtype, amp)
    impl = "foreach" if target == "cuda" else "default"
    units = batch * max(1, math.prod(y_shape))
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), preserved_host_rng(), cuda_attention(target == "cuda"), FakeTensorMode():
        model, optimizer = build_step_objects(workload, param_dtype, amp=amp, checkpointing=checkpointing,
                                              optimizer_impl=impl)
        x = torch.zeros((batch, *x_shape), dtype=x_dtype)
        y = torch.zeros((batch, *y_shape), dtype=y_dtype)
        with Recorder():
            for step in (1, 2):
                state["record"] = step == 2
                state["phase"] = "micro"
                with autocast_context(amp, dtype):
                    loss = workload.loss_sum(model(x), y) / units
                loss.backward()
                del loss
                state["phase"] = "optimizer"
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    trace.seconds = time.perf_counter() - start
    return trace


# ---------------------------------------------------------------- the prediction
