"""Training regimes: fine-tuning from a pretrained start, and regularization hypotheses.

Nothing here is a measured fact. The seeds' fine-tuning rules ("10–20x smaller batch", "LR 10–100x
smaller") and their regularization rules ("weight_decay ∝ √batch", "dropout ∝ √batch") have no
evidence behind them (seeds/README.md, error 9). batchpilot offers them as **hypotheses**: starting
points with their reasoning, each labelled with the sweep that would confirm or reject it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from batchpilot.errors import BatchpilotError
from batchpilot.scaling.lr_rules import default_lr_rule, scale_lr

FINETUNE_BATCH_DIVISOR = 4
"""Default fine-tuning batch = base batch / this (a starting point, not a measured optimum)."""
FINETUNE_LR_DIVISOR = 10
"""Default fine-tuning LR = the scaled from-scratch LR / this (a starting point)."""


def load_pretrained(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from a batchpilot ``checkpoint.pt`` or a plain ``state_dict`` file (``weights_only``).

    Raises:
        BatchpilotError: the file is missing or holds no model weights.
    """
    path = Path(path)
    if not path.is_file():
        raise BatchpilotError(f"pretrained weights {str(path)!r} do not exist")
    if path.stat().st_size == 0:
        raise BatchpilotError(f"pretrained weights {str(path)!r} are an empty file (0 bytes); expected a batchpilot "
                              "checkpoint.pt or a torch.save(model.state_dict()) file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle of arbitrary objects, a corrupt file ...
        # torch's own text is paragraphs long and suggests weights_only=False, which would run the file's code
        import pickle

        why = type(exc).__name__
        if not isinstance(exc, pickle.UnpicklingError):
            why += ": " + " ".join(str(exc).split())[:120]
        raise BatchpilotError(f"pretrained weights {str(path)!r} cannot be loaded as tensors only ({why}); expected a batchpilot checkpoint.pt or a torch.save(model.state_dict()) "
                              "file: files holding other Python objects are refused, not unpickled") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BatchpilotError(f"pretrained weights {str(path)!r} hold no state_dict (expected a batchpilot checkpoint or model.state_dict())")
    return state


@dataclass(frozen=True)
class FinetuneRegime:
    """A fine-tuning starting point: batch, LR and why. Always a hypothesis until a sweep confirms it."""

    batch: int
    lr: float
    lr_rule: str
    reasoning: tuple[str, ...]
    hypothesis: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def finetune_regime(base_batch: int, base_lr: float, optimizer_family: str, *, num_train: int | None = None,
                    batch: int | None = None, batch_divisor: int = FINETUNE_BATCH_DIVISOR,
                    lr_divisor: float = FINETUNE_LR_DIVISOR) -> FinetuneRegime:
    """A smaller batch and LR for training from a pretrained start.

    Args:
        base_batch: the batch the from-scratch LR was tuned at.
        base_lr: that LR.
        optimizer_family: the optimizer class name (picks the LR rule, :func:`default_lr_rule`).
        num_train: fine-tuning set size (the batch is kept to at most a quarter of it).
        batch: the batch, if the user chose one (the LR is then derived at it).
        batch_divisor: batch = base batch / this.
        lr_divisor: LR = the rule-scaled LR at the new batch / this.
    """
    if batch_divisor < 1 or not lr_divisor >= 1:
        raise BatchpilotError(f"fine-tuning divisors must be >= 1, got batch {batch_divisor}, lr {lr_divisor}")
    chosen = batch is not None
    if batch is None:
        batch = max(1, base_batch // batch_divisor)
        if num_train is not None:
            batch = max(1, min(batch, num_train // 4))
    rule = default_lr_rule(optimizer_family)
    lr = scale_lr(base_lr, base_batch, batch, rule) / lr_divisor
    reasoning = (
        f"from a pretrained start the aim is to adapt, not to travel far: the LR is the main lever, so it is "
        f"the {rule}-rule LR at batch {batch} divided by {lr_divisor:g} ({lr:.3g})",
        (f"batch {batch} (given); a" if chosen else f"batch {batch} = {base_batch} / {batch_divisor}: a")
        + " smaller batch gives more updates per pass over a small fine-tuning set, and with the LR rescaled "
        f"by the {rule} rule the batch alone does not enlarge the steps",
        "the gradient noise scale tends to grow as the loss falls (McCandlish et al. 2018), so a pretrained model "
        "may tolerate a larger batch than this: measure B_noise on the pretrained start (batchpilot train --noise-scale) before trusting the divisor",
        "the common advice of a 10-20x smaller batch and a 10-100x smaller LR for fine-tuning is an unproven "
        "heuristic (docs/large-batch.md, fine-tuning); "
        "these defaults are hypotheses to confirm with a sweep over batch and LR from the same pretrained start",
    )
    return FinetuneRegime(batch=batch, lr=lr, lr_rule=rule, reasoning=reasoning)


@dataclass(frozen=True)
class Hypothesis:
    """A regularization change to test, with its rationale and the sweep that tests it."""

    change: str
    rationale: str
    test: str
    status: str = "hypothesis (unconfirmed until the sweep runs)"

    def to_dict(self) -> dict:
        return asdict(self)


def regularization_hypotheses(train_metric: float, val_metric: float, *, higher_is_better: bool, batch: int,
                              base_batch: int, gap_threshold: float = 0.02) -> list[Hypothesis]:
    """Regularization changes to try when a run generalizes worse than it fits.

    The generalization gap is ``train − val`` (``val − train`` for a lower-is-better metric). Below
    ``gap_threshold`` nothing is suggested. Each suggestion is a hypothesis with a sweep to test it;
    none is a rule (the seeds' "∝ √batch" scalings are unproven, seeds/README.md #9).
    """
    gap = (train_metric - val_metric) if higher_is_better else (val_metric - train_metric)
    if not gap > gap_threshold:
        return []
    ratio = batch / base_batch
    where = f"gap {gap:.3g} at batch {batch}"
    return [
        Hypothesis("weight decay x2 (and x0.5 as the control)",
                   f"{where}: if small-batch noise regularizes implicitly (a heuristic: the best weight decay did "
                   f"not move from batch 32 to 512 in docs/claims.md #17), at {ratio:g}x the base batch less of it is left",
                   f"train at batch {batch} with weight decay x{{0.5, 1, 2, 4}} (same seed and budget); keep the best val metric"),
        Hypothesis("dropout 0.1 before the head (if the model has none)",
                   f"{where}: the model fits the training set better than it generalizes",
                   f"train at batch {batch} with dropout in {{0, 0.1, 0.2}} (same seed and budget)"),
        Hypothesis("label smoothing 0.1 (classification)",
                   f"{where}: over-confident fits widen the gap; smoothing caps the logit scale",
                   f"train at batch {batch} with label smoothing in {{0, 0.05, 0.1}} (same seed and budget)"),
    ]
