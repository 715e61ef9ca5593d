"""A stratified batch sampler: a fixed per-class quota in every batch.

Under class imbalance, a uniform random batch of ``B`` often holds no sample of a rare class, and
the number of samples of each class varies from batch to batch. That variation is part of the
gradient's variance. Stratified sampling (classical survey sampling, Cochran 1977, ch. 5) draws a
fixed quota ``q_c`` from each class ``c``. The **stratified estimator**::

    ĝ = Σ_c (N_c / N) · mean_{i in batch, y_i = c} g_i

is unbiased for the full-data mean gradient, and its variance is ``Σ_c (N_c/N)² σ_c² / q_c``: the
between-class part of the variance is gone. With quotas proportional to ``N_c`` the per-sample
weights ``w_i = (N_c/N) / (q_c/B)`` are 1 up to rounding; a rare class lifted to ``min_per_class``
gets a weight below 1, so the weighted loss stays unbiased (:meth:`StratifiedBatchSampler.weights`).

An *epoch* here is ``N // B`` batches. Each class is drawn from its own shuffled order and
reshuffled when used up, so the common classes are seen about once per epoch and a class lifted
above its share is seen more often. The order is a pure function of ``seed``; the position is
plain integers, so a checkpoint restores it exactly.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from batchpilot.errors import BatchpilotError


def proportional_quotas(counts: Sequence[int], batch_size: int, min_per_class: int = 1) -> list[int]:
    """Per-class quotas summing to ``batch_size``: proportional to ``counts`` by largest remainder,
    with at least ``min_per_class`` for every class that has samples.

    Raises:
        BatchpilotError: when the floors alone exceed the batch.
    """
    present = [i for i, c in enumerate(counts) if c > 0]
    if batch_size < min_per_class * len(present):
        raise BatchpilotError(f"batch {batch_size} cannot hold {min_per_class} sample(s) of each of {len(present)} classes")
    total = sum(counts)
    share = {i: batch_size * counts[i] / total for i in present}
    quotas = [0] * len(counts)
    for i in present:
        quotas[i] = max(min_per_class, int(share[i]))
    while sum(quotas) < batch_size:  # largest remainder first
        i = max(present, key=lambda i: (share[i] - quotas[i], -i))
        quotas[i] += 1
    while sum(quotas) > batch_size:  # the floors overshot: take from the most over-served class above its floor
        i = max((i for i in present if quotas[i] > min_per_class), key=lambda i: (quotas[i] - share[i], -i))
        quotas[i] -= 1
    return quotas


class StratifiedBatchSampler:
    """Batches of ``batch_size`` indices with ``quotas[c]`` samples of each class ``c``.

    Args:
        labels: class label of every sample (1-D integer tensor or sequence).
        batch_size: samples per batch.
        min_per_class: floor of every quota (so rare classes appear in every batch).
        quotas: explicit per-class quotas summing to ``batch_size`` (overrides the proportional ones).
        seed: seeds the per-class orders.

    Use in a loop of your own::

        sampler = StratifiedBatchSampler(labels, 64)
        for idx in sampler:                      # one epoch
            x, y = fetch(dataset, idx)
            w = sampler.weights(y)               # unbiased stratified estimator
            loss = (w * F.cross_entropy(model(x), y, reduction="none")).mean()
    """

    def __init__(self, labels, batch_size: int, *, min_per_class: int = 1, quotas: Sequence[int] | None = None,
                 seed: int = 0) -> None:
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        if self.labels.ndim != 1 or len(self.labels) == 0 or int(self.labels.min()) < 0:
            raise BatchpilotError("labels must be a non-empty 1-D tensor of class indices >= 0")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= len(self.labels):
            raise BatchpilotError(f"batch size must be an integer in [1, {len(self.labels)}], got {batch_size!r}")
        self.batch_size, self.seed = batch_size, seed
        self.counts = torch.bincount(self.labels).tolist()
        self.members = [torch.nonzero(self.labels == c).flatten() for c in range(len(self.counts))]
        self.quotas = list(quotas) if quotas is not None else proportional_quotas(self.counts, batch_size, min_per_class)
        if len(self.quotas) != len(self.counts) or sum(self.quotas) != batch_size or any(q < 0 for q in self.quotas):
            raise BatchpilotError(f"quotas must be {len(self.counts)} non-negative counts summing to {batch_size}, got {self.quotas}")
        if any(q > 0 and n == 0 for q, n in zip(self.quotas, self.counts)):
            raise BatchpilotError("a quota asks for a class that has no samples")
        self._class_epoch = [0] * len(self.counts)
        self._class_offset = [0] * len(self.counts)
        self.batches_drawn = 0
        self._cache: dict[int, tuple[tuple[int, int], torch.Tensor]] = {}

    @property
    def batches_per_epoch(self) -> int:
        """``N // batch_size`` (at least 1)."""
        return max(1, len(self.labels) // self.batch_size)

    def _order(self, c: int) -> torch.Tensor:
        key = (self.seed, self._class_epoch[c])
        cached = self._cache.get(c)
        if cached is None or cached[0] != key:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + c) * 1_000_003 + self._class_epoch[c])
            cached = self._cache[c] = (key, self.members[c][torch.randperm(len(self.members[c]), generator=g)])
        return cached[1]

    def _take(self, c: int, k: int) -> torch.Tensor:
        parts, need = [], k
        while need > 0:
            order = self._order(c)
            piece = order[self._class_offset[c]: self._class_offset[c] + need]
            parts.append(piece)
            need -= len(piece)
            self._class_offset[c] += len(piece)
            if self._class_offset[c] >= len(order):
                self._class_epoch[c] += 1
                self._class_offset[c] = 0
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def next_batch(self) -> torch.Tensor:
        """The next batch's indices (classes in label order; shuffle if order matters to the model)."""
        idx = torch.cat([self._take(c, q) for c, q in enumerate(self.quotas) if q > 0])
        self.batches_drawn += 1
        return idx

    def __iter__(self) -> Iterator[torch.Tensor]:
        """One epoch: :attr:`batches_per_epoch` batches."""
        for _ in range(self.batches_per_epoch):
            yield self.next_batch()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def weights(self, batch_labels: torch.Tensor) -> torch.Tensor:
        """Per-sample weights ``(N_c/N) / (q_c/B)`` that make the weighted batch mean unbiased."""
        n, b = len(self.labels), self.batch_size
        table = torch.tensor([(nc / n) / (q / b) if q > 0 else 0.0 for nc, q in zip(self.counts, self.quotas)],
                             dtype=torch.float64)
        return table[batch_labels].to(torch.get_default_dtype())

    def state_dict(self) -> dict:
        """Position (plain integers) for a checkpoint."""
        return {"seed": self.seed, "quotas": list(self.quotas), "class_epoch": list(self._class_epoch),
                "class_offset": list(self._class_offset), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (the quotas must match)."""
        if list(state["quotas"]) != self.quotas:
            raise BatchpilotError(f"checkpoint quotas {state['quotas']} differ from this sampler's {self.quotas}")
        self.seed = int(state["seed"])
        self._class_epoch = [int(v) for v in state["class_epoch"]]
        self._class_offset = [int(v) for v in state["class_offset"]]
        self.batches_drawn = int(state["batches_drawn"])
