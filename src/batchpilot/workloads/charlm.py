"""A small character-level GPT on text that ships with Python (standard-library source).

LayerNorm, causal self-attention, next-token cross-entropy normalised per token.
Structure after nanoGPT (Karpathy), scaled down to train on a laptop CPU.
"""

from __future__ import annotations

import math
import sysconfig
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.errors import BatchpilotError
from batchpilot.workloads.spec import Target, Workload, count_tokens, register

DESC = "char-level GPT (2 layers, LayerNorm) on Python's stdlib source, AdamW; base batch 32 x 64 tokens, LR 2e-3; target val_loss<=2.2"
VOCAB = 128  # ASCII; other bytes map to '?'
# Modules present in every CPython >= 3.10: the corpus is the same text on any install of one version.
SOURCE_MODULES = ("textwrap", "difflib", "argparse", "fractions", "statistics", "heapq", "bisect", "shlex", "calendar")


@lru_cache(maxsize=1)
def corpus_ids() -> torch.Tensor:
    """The corpus as a 1-D tensor of ASCII codes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((stdlib / f"{m}.py").read_text(encoding="utf-8") for m in SOURCE_MODULES)
    data = text.encode("ascii", errors="replace")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long().clamp_(max=VOCAB - 1)


def windows(ids: torch.Tensor, seq_len: int) -> TensorDataset:
    """Non-overlapping (input, next-token target) windows of ``seq_len`` tokens."""
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].view(n, seq_len)
    y = ids[1 : n * seq_len + 1].view(n, seq_len)
    return TensorDataset(x.clone(), y.clone())


class Block(nn.Module):
    """Pre-LN transformer block: causal self-attention and an MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """Token and position embeddings, ``layers`` blocks, final LayerNorm, tied LM head."""

    def __init__(self, seq_len: int = 64, dim: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        s = idx.shape[1]
        if s > self.seq_len:
            raise BatchpilotError(f"sequence length {s} exceeds the model's seq_len {self.seq_len}")
        x = self.tok(idx) + self.pos(torch.arange(s, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok.weight.T  # (b, s, vocab)


def token_loss_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over tokens (ignore index -100)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum", ignore_index=-100)


def _adamw(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))


@register("charlm", DESC)
def charlm(seq_len: int = 64, val_fraction: float = 0.1) -> Workload:
    """Character LM on stdlib source; the last ``val_fraction`` of the text validates."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise BatchpilotError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not 0 < val_fraction < 0.5:
        raise BatchpilotError(f"val_fraction must be in (0, 0.5), got {val_fraction!r}")
    ids = corpus_ids()
    split = int(len(ids) * (1 - val_fraction))
    return Workload(
        name="charlm", make_model=lambda: CharGPT(seq_len=seq_len),
        train_data=windows(ids[:split], seq_len), val_data=windows(ids[split:], seq_len),
        loss_sum=token_loss_sum, metric_sum=token_loss_sum, metric_name="val_loss", higher_is_better=False,
        count_units=count_tokens, make_optimizer=_adamw, base_batch=32, base_lr=2e-3,
        target=Target("val_loss", "<=", 2.2), description=DESC, seq_len=seq_len,
    )
