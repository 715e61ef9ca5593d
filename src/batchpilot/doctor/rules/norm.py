"""Normalization-layer checks: BP501-BP504 (BatchNorm is the one batch-coupled layer)."""

from __future__ import annotations

from typing import Iterator

from batchpilot.doctor.catalog import RULES
from batchpilot.doctor.context import Context
from batchpilot.doctor.findings import Finding

SMALL_BN_BATCH = 16
"""Below this many samples per normalization group BN statistics get noisy (Wu & He 2018, Fig. 1; seed 002)."""

_SWITCH = "GroupNorm or LayerNorm (batch-independent)"


def batchnorm(ctx: Context) -> Iterator[Finding]:
    """BP501 (small per-device batch), BP502 (no SyncBN across ranks), BP503 (DataParallel), BP504 (accumulation)."""
    cfg, m, w, k = ctx.cfg, ctx.micro_batch, ctx.world, ctx.accumulation
    if not cfg.has_batchnorm:
        return
    synced = cfg.bn_synced and cfg.parallel != "dp"
    if m is not None:
        group = m * w if synced else m
        if group < SMALL_BN_BATCH:
            where = f"{m} samples per device" + (f" x {w} ranks with SyncBatchNorm = {group}" if synced else "")
            yield RULES["BP501"].finding(
                "error" if group == 1 else "warning",
                f"BatchNorm normalizes over {where} (< {SMALL_BN_BATCH})"
                + ("; with one sample, BatchNorm1d raises and BatchNorm2d normalizes each sample by itself" if group == 1 else ""),
                f"use {_SWITCH}, SyncBatchNorm across ranks (DDP), or a micro-batch >= {SMALL_BN_BATCH}",
                ("normalization", "micro_batch_per_rank", "sync_bn"))
    if cfg.parallel == "dp":
        yield RULES["BP503"].finding(
            "warning",
            f"BatchNorm under nn.DataParallel over {w} device(s): each replica normalizes its own chunk of the batch"
            + ("; sync_bn has no effect under DataParallel" if cfg.bn_synced else ""),
            "switch to DistributedDataParallel and convert with torch.nn.SyncBatchNorm.convert_sync_batchnorm, or use " + _SWITCH,
            ("normalization", "parallel", "sync_bn"))
    elif w > 1 and not synced:
        yield RULES["BP502"].finding(
            "warning",
            f"BatchNorm without SyncBatchNorm over world_size {w}: statistics come from {m if m else 'each rank'}'s samples"
            f"{' per rank' if m else ''}, not the global batch {ctx.global_batch if ctx.global_batch else ''}".rstrip(),
            "model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) before wrapping in DDP, or use " + _SWITCH,
            ("normalization", "sync_bn", "world_size"))
    if k is not None and k > 1:
        yield RULES["BP504"].finding(
            "warning",
            f"BatchNorm with accumulation_steps {k}: statistics come from micro-batches of {m if m else '?'}, "
            f"but the optimizer steps on {ctx.global_batch if ctx.global_batch else '?'}; the accumulated gradient "
            "is not the large-batch gradient",
            f"use {_SWITCH} to make accumulation exact, raise the micro-batch, or keep it and validate this exact "
            "configuration (batchpilot sweep)",
            ("normalization", "accumulation_steps"))
