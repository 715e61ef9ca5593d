"""The catalog of doctor codes: title, the seed passage it covers, reason and source.

Codes are stable: a code keeps its meaning forever; a retired check leaves a gap.
Numbering: BP0xx the config itself, BP1xx batch geometry and accumulation, BP2xx
learning rate and warmup, BP3xx fine-tuning, BP4xx validation and measurement,
BP5xx normalization layers, BP6xx the accumulation loop, BP7xx plan caveats.

The reasons deliberately avoid the seed's known errors (``seeds/README.md``):
accumulation is exact, not "stale"; the LR rule depends on the optimizer; the
fine-tuning and regularization rules of thumb are hypotheses for a sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchpilot.doctor.findings import Finding


@dataclass(frozen=True)
class Rule:
    """One code: what it checks and why.

    Attributes:
        code: ``BPnnn``.
        title: short name.
        seed: the pitfall / red flag / pattern of the seed documents it covers.
        reason: one line: why it matters.
        source: the citation behind the reason.
    """

    code: str
    title: str
    seed: str
    reason: str
    source: str

    def finding(self, severity: str, message: str, fix: str, fields: tuple[str, ...] = (),
                reason: str | None = None) -> Finding:
        """A :class:`Finding` of this rule with the given values."""
        return Finding(code=self.code, severity=severity, title=self.title, message=message,
                       reason=reason or self.reason, source=self.source, fix=fix, fields=fields)


_GOYAL = "Goyal et al. 2017, Accurate, Large Minibatch SGD"
_MALLADI = "Malladi et al. 2022, On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"
_CRIT = "McCandlish et al. 2018, An Empirical Model of Large-Batch Training; Shallue et al. 2019"

RULES: dict[str, Rule] = {r.code: r for r in (
    Rule("BP001", "unknown field", "-",
         "A misspelt field is ignored, so the check it feeds silently does not run.",
         "batchpilot doctor schema (docs/doctor.md)"),
    Rule("BP002", "not checked", "-",
         "The doctor reports only what it can see; a missing field skips a check instead of guessing.",
         "batchpilot doctor schema (docs/doctor.md)"),
    Rule("BP101", "global batch does not divide", "seed 002 pattern 3 (effective batch = per-GPU batch x GPUs x accumulation)",
         "The batch the optimizer sees is micro-batch x accumulation x world size; a mismatch means the run trains at another batch than the LR was set for.",
         "seed 002 pattern 3; batchpilot TrainConfig"),
    Rule("BP102", "largest batch that fits used as the batch", "seed 002 pitfall 1; red flags 'Just use the maximum batch that fits', 'Maximum batch that fits = optimal batch'",
         "Fitting in memory says nothing about time to target: beyond the critical batch more samples per step buy few fewer steps, and the held-out metric can drop.",
         _CRIT + "; Keskar et al. 2017"),
    Rule("BP103", "micro-batch exceeds the measured maximum", "seed 002 pattern 4 (memory estimation)",
         "The measured peak memory at this micro-batch exceeds the device: the first step runs out of memory.",
         "batchpilot memory measurement (max_micro_batch)"),
    Rule("BP104", "accumulation where a larger micro-batch fits", "seed 002 pattern 3 ('when accumulation is a BAD choice: can fit desired batch'); red flags 'Gradient accumulation is just for memory-constrained settings', 'Gradient accumulation is slow, don't use it'",
         "Micro-batches run one after another; a larger micro-batch with fewer accumulation steps computes the same gradient, usually at more samples/s.",
         "seeds/README.md error 4; measure with batchpilot plan"),
    Rule("BP105", "loss not scaled for accumulation", "seed 002 pattern 3 ('Scale loss by accumulation steps')",
         "Summing k micro-batch mean losses gives k times the batch-mean gradient: with SGD the effective LR is k times too large; Adam is nearly scale-invariant but clipping and eps are not.",
         "seed 002 pattern 3; Kingma & Ba 2015 (Adam's scale invariance)"),
    Rule("BP106", "long accumulation: wall-clock cost only", "seed 002 pitfall 7 (corrected: seeds/README.md error 4)",
         "Parameters do not change during accumulation, so nothing is stale: k micro-batches equal one batch of k x m up to float rounding (BN aside); the cost is k sequential passes per update.",
         "seeds/README.md error 4; tests/test_train_exact.py"),
    Rule("BP107", "ragged last batch", "seeds/README.md error 4 (loss normalisation when batches are ragged)",
         "The last step of each epoch has fewer samples; a loop that averages per micro-batch and divides by k weights those samples unequally.",
         "seeds/README.md error 4"),
    Rule("BP201", "LR not rescaled after a batch change", "seed 002 pitfall 2; red flag 'Just double the learning rate when doubling batch'",
         "The LR was tuned at the base batch; at another batch it must follow the optimizer's scaling rule (linear for SGD, square root for Adam).",
         f"{_GOYAL} (linear, SGD); {_MALLADI} (sqrt, Adam)"),
    Rule("BP202", "LR scaled by the wrong rule for the optimizer", "seed 002 pattern 2 (linear rule for every optimizer; corrected: seeds/README.md error 6)",
         "Linear scaling is an empirical result for SGD; for Adam-family optimizers square-root scaling is the better default.",
         f"{_GOYAL}; {_MALLADI}"),
    Rule("BP203", "LR off the scaling rule", "seed 002 pattern 2",
         "An LR far from the rule's value was neither kept from the base point nor scaled from it; unless it was tuned at this batch it is a guess.",
         f"{_GOYAL}; {_MALLADI}"),
    Rule("BP204", "accumulation with the LR tuned for the micro-batch", "seed 002 pitfall 4",
         "The optimizer steps on the accumulated batch, not the micro-batch; an LR tuned for the micro-batch under-steps by the scaling factor.",
         f"seed 002 pitfall 4; {_GOYAL}"),
    Rule("BP205", "batch beyond the critical batch", "seed 002 pattern 2 ('CASE 2: scaling doesn't work'); seeds/README.md error 6",
         "LR scaling rules hold up to about the critical batch (~ the gradient noise scale); beyond it steps to target stop falling and the rule over-predicts the LR.",
         _CRIT),
    Rule("BP206", "large LR jump without warmup", "seed 002 pitfall 3; red flags 'Just double the learning rate when doubling batch', 'I don't need warmup, I'll just use scaled LR'",
         "Starting at a much larger LR than the base point can diverge in the first steps; a gradual warmup removed the early instability at large batch.",
         f"{_GOYAL} (gradual warmup over 5 epochs)"),
    Rule("BP301", "fine-tuning at the pre-training batch", "seed 002 pitfall 10; red flag 'Fine-tuning works same as pre-training, just different data'",
         "Fine-tuning recipes use far fewer samples per step than pre-training; the seed's '10-20x smaller' is a heuristic without evidence, so treat a smaller batch as a hypothesis to sweep.",
         "seed 002 pitfall 10; seeds/README.md error 9"),
    Rule("BP302", "fine-tuning at the pre-training LR", "seed 002 pitfall 10; red flag 'Fine-tuning works same as pre-training'",
         "Published fine-tuning LRs are well below the pre-training LR (BERT: 1e-4 pre-training, 2e-5 to 5e-5 fine-tuning).",
         "Devlin et al. 2019 (BERT); seed 002 pitfall 10"),
    Rule("BP401", "batch changed with no validation run", "seed 002 pitfalls 5 and 9; red flags 'Linear scaling rule means I don't need to validate', 'Batch size only affects speed, not accuracy'",
         "Scaling rules predict the optimization speed, not the final held-out metric; the metric at a new batch must be measured.",
         f"{_GOYAL} (validated up to 8k); Shallue et al. 2019; Keskar et al. 2017"),
    Rule("BP402", "batch taken from a paper, not validated", "seed 002 red flags 'I'll use the batch size from a paper', 'My paper used batch X'",
         "A batch that was best for another model, data set and machine is a starting point, not a result.",
         "seed 002 red flags; Shallue et al. 2019 (best batch varies by workload)"),
    Rule("BP403", "larger batch without a throughput measurement", "seed 002 red flags 'Larger batch = faster training', 'I increased batch, why is training slower?'",
         "Time to target = steps(B) x time per step(B); a larger batch needs fewer steps only up to the critical batch and each step costs more.",
         f"{_CRIT}; seed 002 pattern 1"),
    Rule("BP501", "BatchNorm with a small per-device batch", "seed 002 pattern 8, interaction 6 ('BatchNorm with small batch (< 16)')",
         "BatchNorm normalizes with statistics of the per-device batch; below about 16 samples they are noisy and the error rises sharply.",
         "Wu & He 2018, Group Normalization (Fig. 1); seed 002 pattern 8"),
    Rule("BP502", "BatchNorm across ranks without SyncBatchNorm", "seed 002 pitfall 6; seed 000 (SyncBN)",
         "Each rank normalizes with its own micro-batch statistics, not the global batch's; in contrastive setups the per-device statistics can also leak information (reported at scale; a tiny 2-rank run saw rank-dependent features but no shortcut: docs/claims.md #24), so compare with SyncBatchNorm.",
         "seed 002 pitfall 6; seed 000; PyTorch SyncBatchNorm docs"),
    Rule("BP503", "BatchNorm under DataParallel", "seed 002 pitfall 6 (its DataParallel example)",
         "nn.DataParallel splits the batch over devices and each replica normalizes its own chunk; SyncBatchNorm only works under DistributedDataParallel.",
         "PyTorch docs: torch.nn.SyncBatchNorm (DDP only), DataParallel"),
    Rule("BP504", "BatchNorm combined with gradient accumulation", "seed 000 (BN bias under accumulation); seeds/README.md error 5",
         "BatchNorm computes statistics per micro-batch, so the accumulated gradient is not the gradient of the full batch (the only case where accumulation is not exact).",
         "seed 000; seeds/README.md error 5; Ioffe & Szegedy 2015"),
    Rule("BP601", "EMA updated per micro-batch", "seed 002 pitfall 8",
         "The weights only change on optimizer steps; updating the EMA on every micro-batch applies its decay k times per step, shortening its horizon k-fold.",
         "seed 002 pitfall 8; Polyak & Juditsky 1992 (averaging per iterate)"),
    Rule("BP602", "LR scheduler stepped per micro-batch", "seed 002 pitfall 8 (scheduler with accumulation)",
         "Schedules count optimizer steps; stepping per micro-batch runs warmup and decay k times too fast.",
         "seed 002 pitfall 8; PyTorch LRScheduler docs (step after optimizer.step())"),
    Rule("BP603", "gradients zeroed per micro-batch", "seed 002 pattern 3 ('Accumulate gradients (don't zero!)')",
         "zero_grad between micro-batches discards all but the last micro-batch, so the step uses a batch of m, not k x m.",
         "seed 002 pattern 3"),
    Rule("BP701", "plan caveat", "DESIGN.md plan caveats",
         "The planner flagged this when it chose the plan.",
         "batchpilot plan"),
)}
