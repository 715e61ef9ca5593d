"""Process checks: fine-tuning (BP301-BP302), validation and measurement (BP401-BP403), plan caveats (BP701)."""

from __future__ import annotations

from typing import Iterator

from batchpilot.doctor.catalog import RULES
from batchpilot.doctor.context import Context, fmt
from batchpilot.doctor.findings import Finding


def finetune(ctx: Context) -> Iterator[Finding]:
    """BP301/BP302: fine-tuning with the pre-training batch or LR."""
    cfg, B = ctx.cfg, ctx.global_batch
    if not cfg.finetune:
        return
    if cfg.pretrain_batch is not None and B is not None and B >= cfg.pretrain_batch:
        smaller = sorted({max(1, B // 4), max(1, B // 16)})
        yield RULES["BP301"].finding(
            "warning", f"fine-tuning at global batch {B}, >= the pre-training batch {cfg.pretrain_batch}",
            f"sweep smaller batches (e.g. {', '.join(map(str, smaller))}) with the LR rescaled and keep the best held-out metric; "
            "a 10-20x smaller batch is a hypothesis, not a rule",
            ("finetune", "global_batch", "pretrain_batch"))
    if cfg.pretrain_lr is not None and cfg.lr is not None and cfg.lr >= cfg.pretrain_lr:
        yield RULES["BP302"].finding(
            "warning", f"fine-tuning at lr {fmt(cfg.lr)}, >= the pre-training lr {fmt(cfg.pretrain_lr)}",
            f"start around {fmt(cfg.pretrain_lr / 10)} (10x below pre-training, a starting point) and sweep the LR",
            ("finetune", "lr", "pretrain_lr"))


def validation(ctx: Context) -> Iterator[Finding]:
    """BP401 (batch changed, not validated), BP402 (batch from a paper), BP403 (throughput not measured)."""
    cfg, B, B0 = ctx.cfg, ctx.global_batch, ctx.cfg.base_batch
    validated = cfg.validated is True or cfg.batch_source == "sweep"
    if B is not None and B0 is not None and B != B0 and not validated:
        yield RULES["BP401"].finding(
            "warning", f"global batch {B} differs from base_batch {B0} ({fmt(B / B0)}x) and no validation run is recorded",
            "train at this batch and LR, compare the held-out metric with the base point (batchpilot sweep), then set validated: true",
            ("global_batch", "base_batch", "validated"))
    if cfg.batch_source == "paper" and not validated:
        yield RULES["BP402"].finding(
            "warning", f"batch_source is paper (global batch {B if B is not None else '?'}) and no validation run is recorded",
            "use the paper's batch as the starting point of a sweep on this model, data and machine; set validated: true after",
            ("batch_source", "validated"))
    if (B is not None and B0 is not None and B > B0 and cfg.throughput_measured is not True
            and cfg.batch_source not in ("plan", "sweep")):
        yield RULES["BP403"].finding(
            "info", f"global batch {B} is larger than base_batch {B0} but throughput_measured is not set",
            "measure samples/s and steps to target at both batches (batchpilot plan / sweep); set throughput_measured: true",
            ("global_batch", "throughput_measured"))


def caveats(ctx: Context) -> Iterator[Finding]:
    """BP701: each caveat a ``batchpilot plan`` wrote into its plan."""
    for text in ctx.cfg.caveats or ():
        yield RULES["BP701"].finding("info", " ".join(text.split()) or "(empty caveat)",
                                     "read the plan's report.html for the evidence behind it", ("caveats",))
