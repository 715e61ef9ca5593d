"""Bench workload (d): a character-level GRU language model on the source of Python's ``email`` package, Adam.

The corpus is every ``.py`` file of the standard library's ``email`` package (sorted by path), read from
this interpreter's stdlib (no download; the text differs between Python versions, so results carry the
version). ASCII codes as tokens, non-overlapping windows of 64, the last 10 % of the text validates.
The loss is next-character cross-entropy summed per token, and the trainer normalises by the token
count (like the built-in ``charlm``). Adam: square-root LR scaling.

Load with ``bench/workloads/email_gru.py:make_workload``.
"""

from __future__ import annotations

import sysconfig
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from batchpilot.workloads import Workload
from batchpilot.workloads.charlm import VOCAB, token_loss_sum, windows
from batchpilot.workloads.spec import Target, count_tokens

NAME = "email-chargru-adam"
BASE_BATCH, BASE_LR = 32, 2e-3
SEQ_LEN = 64
TARGET = Target("val_loss", "<=", 2.0)


@lru_cache(maxsize=1)
def corpus_ids() -> torch.Tensor:
    """The ``email`` package's source as ASCII codes (other bytes become '?')."""
    root = Path(sysconfig.get_paths()["stdlib"]) / "email"
    files = sorted(root.rglob("*.py"))
    if not files:
        raise FileNotFoundError(f"no Python sources under {root}: this interpreter ships without the email package's source")
    text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    data = text.encode("ascii", errors="replace")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long().clamp_(max=VOCAB - 1)


class CharGRU(nn.Module):
    """Embedding, one GRU layer, a linear read-out to the 128 ASCII codes."""

    def __init__(self, dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(self.embed(idx))
        return self.head(h)  # (batch, seq, vocab)


def _adam(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


def make_workload(val_fraction: float = 0.1) -> Workload:
    """Windows of ``SEQ_LEN`` characters; the last ``val_fraction`` of the text validates."""
    ids = corpus_ids()
    split = int(len(ids) * (1 - val_fraction))
    return Workload(
        name=NAME, make_model=CharGRU, train_data=windows(ids[:split], SEQ_LEN), val_data=windows(ids[split:], SEQ_LEN),
        loss_sum=token_loss_sum, metric_sum=token_loss_sum, metric_name="val_loss", higher_is_better=False,
        count_units=count_tokens, make_optimizer=_adam, base_batch=BASE_BATCH, base_lr=BASE_LR, target=TARGET,
        description=f"char-level GRU on the stdlib email package's source, Adam; base batch {BASE_BATCH} x {SEQ_LEN} "
                    f"tokens, LR {BASE_LR:g}; target {TARGET}", seq_len=SEQ_LEN,
    )
