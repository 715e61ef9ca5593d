"""Claim: BatchNorm leaks the future in an autoregressive model; LayerNorm does not.

Seed 000 ("The Freedom of Independence"): "BN computes statistics across a batch of sentences,
effectively 'looking' at all words in all sentences at once. In an autoregressive model that tries to
predict the next word, this leaks information from the future, allowing the model to cheat."

Two models, each with its normalization as LayerNorm or as BatchNorm over (batch, position) per
channel — the way BN is applied to a sequence:

A. A causal bigram LM (embedding -> norm -> MLP -> next-token logits; each position sees only its own
   token) on "topic" sequences: each sequence draws its 32 tokens uniformly from its own random 4 of
   16 symbols. Given only the current token, the best possible loss is
   -(1/4 ln 1/4 + 3/4 ln 1/20) = 2.593 nats/token; knowing the sequence's 4 symbols it would be
   ln 4 = 1.386. A validation loss below 2.593 is information from other positions; at position 0,
   which has no past, it can only come from the future. Batches of 1 and 8 sequences, 3000 steps.
B. batchpilot's char GPT (``charlm``'s ``CharGPT``: 2 pre-norm blocks, causal attention, dim 64) on
   the charlm corpus (Python's stdlib source), batch 4 x 32 tokens, 300 steps. The channel: change
   the *last* token of every sequence of a batch and measure the largest change of the logits at the
   earlier positions, which a causal model must not let it reach.

Each trained model is evaluated with BN's statistics taken from the batch itself (train mode, as in
training), from a *different* batch of the validation set (shuffled batch composition: the same kind
of statistics, none of this batch's content), and from the running averages (eval mode, what
generation one token at a time can use).

    python bench/claims/bn_leak.py      # about 1 minute of CPU on one thread
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from torch.utils.data import TensorDataset

import _curves
from batchpilot.workloads import Workload
from batchpilot.workloads.charlm import CharGPT, corpus_ids, token_loss_sum, windows
from batchpilot.workloads.spec import count_tokens


class SeqBatchNorm(nn.Module):
    """BatchNorm1d over (batch, position) for each channel of a ``(b, s, d)`` input.

    ``borrow``: ``None`` (ordinary BN), ``"record"`` (normalise with this batch's statistics and keep
    them) or ``"use"`` (normalise with the kept statistics of another batch).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.borrow: str | None = None
        self.kept: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.borrow is None or not self.training:
            return self.bn(x.transpose(1, 2)).transpose(1, 2)
        if self.borrow == "record":
            flat = x.reshape(-1, x.shape[-1])
            self.kept = (flat.mean(0), flat.var(0, unbiased=False))
        mean, var = self.kept
        return (x - mean) / torch.sqrt(var + self.bn.eps) * self.bn.weight + self.bn.bias


def make_model(norm: str, seq_len: int) -> nn.Module:
    m = CharGPT(seq_len=seq_len)
    if norm == "bn":
        for block in m.blocks:
            block.ln1, block.ln2 = SeqBatchNorm(64), SeqBatchNorm(64)
        m.ln_f = SeqBatchNorm(64)
    return m


def workload(name: str, norm: str, train: TensorDataset, val: TensorDataset, seq_len: int) -> Workload:
    return Workload(name=f"{name}-{norm}", make_model=lambda: make_model(norm, seq_len), train_data=train,
                    val_data=val, loss_sum=token_loss_sum, metric_sum=token_loss_sum, metric_name="val_loss",
                    higher_is_better=False, count_units=count_tokens,
                    make_optimizer=lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.01, betas=(0.9, 0.99)),
                    base_batch=4, base_lr=2e-3)


@torch.no_grad()
def val_loss(model: nn.Module, val: TensorDataset, batch: int, mode: str) -> tuple[float, float]:
    """Mean token loss over the validation set in batches of ``batch``, and the mean at position 0 alone:
    ``eval`` (running statistics), ``own`` (train-mode statistics of the batch itself) or ``other``
    (train-mode statistics of the next batch, cyclically)."""
    x, y = val.tensors
    n = len(x) // batch * batch
    model.train(mode != "eval")
    bns = [m for m in model.modules() if isinstance(m, SeqBatchNorm)]
    saved = [(m.bn.running_mean.clone(), m.bn.running_var.clone(), m.bn.num_batches_tracked.clone()) for m in bns]
    total, units, first = 0.0, 0, 0.0
    for i in range(0, n, batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        if mode == "other":
            j = (i + batch) % n
            for m in bns:
                m.borrow = "record"
            model(x[j:j + batch])
            for m in bns:
                m.borrow = "use"
        logits = model(xb)
        total += float(token_loss_sum(logits, yb))
        first += float(token_loss_sum(logits[:, :1], yb[:, :1]))
        units += yb.numel()
        for m in bns:
            m.borrow = None
    for m, (rm, rv, nb) in zip(bns, saved):  # train-mode evaluation must not move the running statistics
        m.bn.running_mean.copy_(rm), m.bn.running_var.copy_(rv), m.bn.num_batches_tracked.copy_(nb)
    model.train()
    return total / units, first / (n)


@torch.no_grad()
def future_reach(model: nn.Module, x: torch.Tensor, train_mode: bool) -> float:
    """Largest |change| of the logits at positions 0..s-2 when the last token of every sequence changes."""
    model.train(train_mode)
    before = model(x)[:, :-1]
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 16
    after = model(x2)[:, :-1]
    model.train()
    return float((after - before).abs().max())


def topic_sequences(n: int, seq_len: int, vocab: int, k: int, seed: int) -> TensorDataset:
    """Each sequence: ``seq_len + 1`` tokens uniform over its own random ``k`` of ``vocab`` symbols."""
    g = torch.Generator().manual_seed(seed)
    subsets = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    ids = torch.gather(subsets, 1, torch.randint(0, k, (n, seq_len + 1), generator=g))
    return TensorDataset(ids[:, :-1].clone(), ids[:, 1:].clone())


class Bigram(nn.Module):
    """Next-token logits from the current token alone (a causal bigram LM), with a norm after the embedding."""

    def __init__(self, norm: str, vocab: int = 16, dim: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = SeqBatchNorm(dim) if norm == "bn" else nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, vocab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(self.emb(x)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seq, V, k = 32, 16, 4
    bound = -(1 / k * math.log(1 / k) + (k - 1) / k * math.log((k - 1) / (V - 1) / k))
    head = ("| model, data | norm | batch | train loss (last 200 steps) | val: own batch stats (train mode) | "
            "val: another batch's stats | val: running stats (eval mode) | position 0 only: own / another / running |")
    rule = "|---|---|---:|---:|---:|---:|---:|---|"

    tr, va = topic_sequences(4000, seq, V, k, 1), topic_sequences(256, seq, V, k, 2)
    print(f"A. causal bigram LM, topic sequences ({k} of {V} symbols, {seq} tokens), AdamW 3e-3, 3000 steps, "
          f"seed {args.seed}; bound for a causal model that sees the current token only: {bound:.3f} nats/token")
    print(head)
    print(rule)
    for norm in ("ln", "bn"):
        for B in (1, 8):
            w = Workload(name=f"topic-{norm}", make_model=lambda norm=norm: Bigram(norm), train_data=tr, val_data=va,
                         loss_sum=token_loss_sum, metric_sum=token_loss_sum, metric_name="val_loss",
                         higher_is_better=False, count_units=count_tokens,
                         make_optimizer=lambda p, lr: torch.optim.AdamW(p, lr=lr), base_batch=B, base_lr=3e-3)
            c = _curves.run_curve(w, batch=B, lr=3e-3, samples=B * 3000, eval_at=[], seed=args.seed, diverge_factor=1e9)
            res = {mode: val_loss(c.model, va, B, mode) for mode in ("own", "other", "eval")}
            print(f"| bigram, topic | {norm.upper()} | {B} | {sum(c.losses[-200:]) / 200:.3f} | {res['own'][0]:.3f} | "
                  f"{res['other'][0]:.3f} | {res['eval'][0]:.3f} | "
                  + " / ".join(f"{res[m][1]:.3f}" for m in ("own", "other", "eval")) + " |", flush=True)

    ids = corpus_ids()
    split = int(len(ids) * 0.9)
    tr, va = windows(ids[:split], seq), windows(ids[split:], seq)
    B = 4
    print(f"\nB. CharGPT (2 blocks, dim 64) on the charlm corpus, batch {B} x {seq} tokens, AdamW 2e-3, 300 steps, "
          f"seed {args.seed}")
    print(head + " max logit change at earlier positions from the last token: train / eval mode |")
    print(rule + "---|")
    for norm in ("ln", "bn"):
        w = workload("charlm", norm, tr, va, seq)
        c = _curves.run_curve(w, batch=B, lr=2e-3, samples=B * 300, eval_at=[], seed=args.seed, diverge_factor=1e9)
        res = {mode: val_loss(c.model, va, B, mode) for mode in ("own", "other", "eval")}
        x = va.tensors[0][:B].clone()
        reach = (future_reach(c.model, x, True), future_reach(c.model, x, False))
        print(f"| CharGPT, charlm text | {norm.upper()} | {B} | {sum(c.losses[-100:]) / 100:.3f} | {res['own'][0]:.3f} | "
              f"{res['other'][0]:.3f} | {res['eval'][0]:.3f} | "
              + " / ".join(f"{res[m][1]:.3f}" for m in ("own", "other", "eval"))
              + f" | {reach[0]:.2e} / {reach[1]:.2e} |", flush=True)


if __name__ == "__main__":
    main()
