"""Data for the Hugging Face workloads (:mod:`batchpilot.workloads.hf`), with nothing to download: byte-level
windows of text (Python's standard-library source, or the user's files), a generated marker-majority
classification task, and random tokens for memory-only workloads.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from batchpilot.errors import BatchpilotError

NUM_ITEMS = 64
"""Random-token samples of a memory-only workload (enough to trace and to time steps)."""
BYTE_VOCAB = 256
DATA_KINDS = ("random", "stdlib", "generated")
MARKERS = (1, 2)
"""Generated ``cls`` task: the two marker tokens (label 1 when marker 1 appears more often)."""
FIRST_NOISE_TOKEN = 4
MAX_MARKERS = 15


def read_text_bytes(data: str) -> tuple[bytes, str]:
    """``stdlib`` or a path (file or directory of text files) -> the bytes and a one-line description."""
    if data == "stdlib":
        from batchpilot.workloads.charlm import SOURCE_MODULES

        stdlib = Path(sysconfig.get_paths()["stdlib"])
        raw = b"\n".join((stdlib / f"{m}.py").read_bytes() for m in SOURCE_MODULES)
        return raw, f"Python stdlib source ({len(SOURCE_MODULES)} modules, as charlm)"
    files = _text_files(data)
    parts = [f.read_bytes() for f in files]
    return b"\n".join(parts), f"{data} ({len(files)} file{'s' if len(files) != 1 else ''})"


def _text_files(data: str) -> list[Path]:
    path = Path(data).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise BatchpilotError(f"data {data!r} is neither {', '.join(DATA_KINDS)} nor an existing file or directory")
    files = [f for f in sorted(path.rglob("*")) if f.is_file() and not any(p.startswith(".") for p in f.parts[-1:])]
    files = [f for f in files if b"\0" not in f.read_bytes()[:4096]]  # skip binary files
    if not files:
        raise BatchpilotError(f"data directory {data!r} holds no text files")
    return files


def _byte_ids(raw: bytes, vocab: int) -> torch.Tensor:
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() if raw else torch.zeros(0, dtype=torch.long)
    if vocab < BYTE_VOCAB and len(ids) and int(ids.max()) >= vocab:
        raise BatchpilotError(f"byte-level text needs vocab_size >= {BYTE_VOCAB}, got {vocab}")
    return ids


def _windows(ids: torch.Tensor, seq_len: int, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of ``seq_len`` tokens; with ``shift`` the targets are the next tokens."""
    n = (len(ids) - 1) // seq_len if shift else len(ids) // seq_len
    x = ids[: n * seq_len].view(n, seq_len).clone()
    y = ids[1: n * seq_len + 1].view(n, seq_len).clone() if shift else x.clone()
    return x, y


def lm_text_data(data: str, seq_len: int, vocab: int, *, is_decoder: bool, val_fraction: float = 0.1,
                 ) -> tuple[TensorDataset, TensorDataset, str]:
    """Language-model windows of byte-level text; the last ``val_fraction`` of the text validates.

    A decoder predicts the next token. An encoder's masked LM predicts 15% of the tokens, masked with
    token 0 (targets -100 elsewhere), with a fixed generator.
    """
    raw, desc = read_text_bytes(data)
    ids = _byte_ids(raw, vocab)
    split = int(len(ids) * (1 - val_fraction))
    sets = []
    for part in (ids[:split], ids[split:]):
        x, y = _windows(part, seq_len, shift=is_decoder)
        if not is_decoder:
            g = torch.Generator().manual_seed(len(sets))
            masked = torch.rand(x.shape, generator=g) < 0.15
            y = torch.where(masked, x, torch.full_like(x, -100))
            x = torch.where(masked, torch.zeros_like(x), x)
        sets.append(TensorDataset(x, y))
    train, val = sets
    if len(train) < 1 or len(val) < 1:
        raise BatchpilotError(f"data {data!r}: {len(ids)} bytes are too few for {seq_len}-token windows with "
                              f"{val_fraction:.0%} held out; give more text or a shorter seq_len")
    return train, val, f"{desc}, {len(ids)} bytes, {len(train)} train / {len(val)} val windows"


def cls_text_data(data: str, seq_len: int, vocab: int, *, val_fraction: float = 0.1,
                  ) -> tuple[TensorDataset, TensorDataset, int, str]:
    """One class per text file of a directory: windows labelled by their file (the last windows of each validate)."""
    files = _text_files(data)
    if len(files) < 2:
        raise BatchpilotError(f"data {data!r}: a cls head on text needs a directory of at least 2 files (one class each)")
    xs, ys, vx, vy = [], [], [], []
    for label, f in enumerate(files):
        x, _ = _windows(_byte_ids(f.read_bytes(), vocab), seq_len, shift=False)
        n_val = max(1, int(len(x) * val_fraction)) if len(x) > 1 else 0
        if len(x) - n_val < 1:
            raise BatchpilotError(f"data file {str(f)!r} is shorter than two {seq_len}-token windows")
        xs.append(x[: len(x) - n_val])
        vx.append(x[len(x) - n_val:])
        ys.append(torch.full((len(x) - n_val,), label))
        vy.append(torch.full((n_val,), label))
    train = TensorDataset(torch.cat(xs), torch.cat(ys))
    val = TensorDataset(torch.cat(vx), torch.cat(vy))
    return train, val, len(files), f"{data}: {len(files)} files = classes, {len(train)} train / {len(val)} val windows"


def generated_cls_data(num: int, seq_len: int, vocab: int, *, seed: int) -> TensorDataset:
    """The generated classification task: which of two marker tokens occurs more often.

    Each sequence holds uniform noise tokens (``>= 4``) and an odd number (1, 3, ..., 15) of markers at
    random positions, each marker 1 or 2 with equal probability; the label is 1 when marker 1 is the
    majority. Position 0 is token 3 (a [CLS]-like start token). Counting over the whole sequence is what
    attention must learn; a bag of words would do as well, so it trains in seconds on a CPU.
    """
    if vocab < FIRST_NOISE_TOKEN + 2:
        raise BatchpilotError(f"the generated task needs vocab_size >= {FIRST_NOISE_TOKEN + 2}, got {vocab}")
    if seq_len < 4:
        raise BatchpilotError(f"the generated task needs seq_len >= 4, got {seq_len}")
    g = torch.Generator().manual_seed(seed)
    hi = min(vocab, BYTE_VOCAB)
    x = torch.randint(FIRST_NOISE_TOKEN, hi, (num, seq_len), generator=g)
    x[:, 0] = 3
    most = min(MAX_MARKERS, seq_len - 1 - (seq_len % 2 == 1))
    counts = 1 + 2 * torch.randint(0, (most + 1) // 2, (num, 1), generator=g)
    pos = 1 + torch.rand(num, seq_len - 1, generator=g).argsort(dim=1)[:, :most]  # distinct positions per row
    first = torch.randint(0, 2, (num, most), generator=g) == 0  # marker 1, else marker 2
    used = torch.arange(most) < counts  # the first `count` of them
    x.scatter_(1, pos, torch.where(used, torch.where(first, MARKERS[0], MARKERS[1]), x.gather(1, pos)))
    y = ((first & used).sum(dim=1) > counts.squeeze(1) // 2).long()
    return TensorDataset(x, y)


def random_tokens(seq_len: int, vocab: int, head: str, is_decoder: bool, num_labels: int) -> TensorDataset:
    """Random tokens for memory-only workloads (own generator)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (NUM_ITEMS, seq_len + 1), generator=g)
    x = ids[:, :-1].clone()
    if head == "lm":
        y = ids[:, 1:].clone() if is_decoder else ids[:, :-1].clone()
    else:
        y = torch.randint(0, num_labels, (NUM_ITEMS,), generator=g)
    return TensorDataset(x, y)
