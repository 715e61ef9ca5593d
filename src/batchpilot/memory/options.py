"""Step options that change memory: dtype/AMP, gradient checkpointing, optimizer kernels, attention kernel.

These helpers act on the *tracing copies* of a model and optimizer only (built under
fake mode by :mod:`batchpilot.memory.trace`); nothing here touches a user's objects.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from batchpilot.errors import BatchpilotError

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16" -> torch.bfloat16``; raise a clear error for anything but the three training dtypes."""
    if name not in DTYPES:
        raise BatchpilotError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters and buffers to ``dtype`` in place, keeping tied parameters tied.

    ``Module.to`` cannot swap fake parameters (they carry weak references), so the
    parameters are replaced one by one; a parameter shared by two modules (a tied LM
    head) is converted once.
    """
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_floating_point():
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(dtype)
    return model


def autocast_context(amp: bool, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast for AMP: fp32 weights, ops in ``dtype`` (bf16 when ``dtype`` is float32).

    The trace runs CPU kernels, so this is CPU autocast; its op lists match CUDA's for
    matmuls/convs (lowered) and reductions/norms (kept in fp32), which is what sets memory.
    """
    if not amp:
        return contextlib.nullcontext()
    low = torch.bfloat16 if dtype == "float32" else torch_dtype(dtype)
    return torch.autocast(device_type="cpu", dtype=low)


class _Checkpointed(nn.Module):
    """Runs ``inner`` under non-reentrant activation checkpointing (Chen et al. 2016)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def apply_checkpointing(model: nn.Module) -> int:
    """Turn on activation checkpointing (Chen et al. 2016) per block; return how many segments.

    * A model with ``gradient_checkpointing_enable`` (Hugging Face) uses its own.
    * Otherwise every entry of every ``nn.ModuleList`` (transformer blocks) is checkpointed.
    * With no ``ModuleList``, each child of the root that holds parameters is one segment,
      except that an ``nn.Sequential`` of 4 or more modules is cut into ceil(sqrt(n))
      segments, as ``torch.utils.checkpoint.checkpoint_sequential`` does.

    Only tracing copies are modified (module names change; nothing is saved from them).
    """
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if callable(enable):
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return sum(1 for m in model.modules() if getattr(m, "gradient_checkpointing", False))
    count = 0
    for mlist in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
        for i, block in enumerate(mlist):
            mlist[i] = _Checkpointed(block)
            count += 1
    if count:
        return count
    owners = [model] if isinstance(model, nn.Sequential) else []
    if not owners:
        for name, child in list(model.named_children()):
            if not any(True for _ in child.parameters()):
                continue
            if isinstance(child, nn.Sequential) and len(child) >= 4:
                owners.append(child)
            else:
                setattr(model, name, _Checkpointed(child))
                count += 1
    for seq in owners:
        mods = list(seq)
        size = math.ceil(len(mods) / math.ceil(math.sqrt(len(mods))))
        groups = [mods[i:i + size] for i in range(0, len(mods), size)]
        for key in list(seq._modules):
            del seq._modules[key]
        for i, group in enumerate(groups):
            seq.add_module(str(i), _Checkpointed(nn.Sequential(*group)))
            count += 1
    return count


def force_optimizer_impl(optimizer: torch.optim.Optimizer, impl: str) -> None:
    """Set ``foreach``/``fused`` on every param group: ``"foreach"``, ``"fused"``, ``"for-loop"`` or ``"default"``.

    A CUDA target uses ``foreach`` unless the optimizer asked for something else, as
    ``torch.optim`` does on CUDA; the horizontal (foreach) kernels allocate whole-model
    temporaries that the per-tensor loop does not.
    """
    if impl == "default":
        return
    if impl not in ("foreach", "fused", "for-loop"):
        raise BatchpilotError(f"optimizer implementation must be default/foreach/fused/for-loop, got {impl!r}")
    for group in optimizer.param_groups:
        if "foreach" not in group:
            continue  # optimizers without horizontal kernels
        if impl == "fused" and "fused" not in group:
            raise BatchpilotError(f"{type(optimizer).__name__} has no fused implementation")
        explicit = group.get("fused") or group.get("foreach") is not None
        if impl == "foreach" and explicit:
            continue  # the user's explicit choice wins
        group["foreach"] = impl == "foreach"
        if "fused" in group:
            group["fused"] = impl == "fused"


def build_step_objects(workload: Any, param_dtype: torch.dtype, *, amp: bool, checkpointing: bool,
                       optimizer_impl: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh model (cast, train mode, optionally checkpointed) and its optimizer, as the step to measure uses them.

    Called under fake tensors by the trace and for real by the measurement, so both see the same objects.
    """
    model = workload.make_model()
    if not amp and param_dtype != torch.float32:
        model = cast_model(model, param_dtype)
    model.train()
    if checkpointing:
        apply_checkpointing(model)
    optimizer = workload.make_optimizer(model.parameters(), workload.base_lr)
    force_optimizer_impl(optimizer, optimizer_impl)
    return model, optimizer


def _flash_like(orig: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(orig)
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if kwargs or query.dim() != 4 or query.shape[-3] != key.shape[-3]:
            return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kwargs)
        # Flash/memory-efficient CUDA kernels save (q, k, v, out, logsumexp) and regenerate dropout
        # from a Philox seed: O(s) per head. The CPU flash kernel saves the same set; run it without
        # dropout (which would push CPU onto the O(s^2) math path) so the trace charges what CUDA allocates.
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, bool(is_causal), attn_mask=attn_mask, scale=scale)
        return out

    return sdpa


@contextlib.contextmanager
def cuda_attention(enabled: bool) -> Iterator[None]:
    """While tracing for a CUDA target, route ``F.scaled_dot_product_attention`` to a flash-like kernel.

    Explicit attention (``softmax(q @ k.T) @ v`` written out) is still charged its
    O(s^2) score tensors: it allocates them on CUDA too.
    """
    if not enabled or not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        yield
        return
    orig = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_like(orig)  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig  # type: ignore[assignment]
