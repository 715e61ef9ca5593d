"""Memory-only workloads: GPT-2 and BERT built from configs through ``transformers``, with no download.

``hf:gpt2`` (GPT-2 small, 124M), ``hf:bert-base`` and ``hf:bert-large`` are built from
the library's default configs (GPT-2 small and bert-base-uncased are the defaults of
``GPT2Config``/``BertConfig``; bert-large changes width/depth/heads), or from a local
``config.json`` (``hf:path/to/config.json``). The head is ``lm`` (causal LM for GPT-2,
masked LM for BERT) or ``cls`` (sequence classification, 2 labels). Attention uses
``attn_implementation="sdpa"``.

The training data is a small random token set (own generator): enough to trace
memory and to time steps, not to train anything. Needs the optional extra
``pip install batchpilot[hf]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.errors import BatchpilotError
from batchpilot.workloads import Workload, count_tokens, register

HEADS = ("lm", "cls")
NUM_ITEMS = 64
BERT_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}


def transformers_available() -> bool:
    """Whether the optional ``transformers`` dependency is installed."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _require() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise BatchpilotError("hf: workloads need the optional extra: pip install 'batchpilot[hf]' (transformers)") from exc
    return transformers


class HFLogits(nn.Module):
    """Wraps a ``transformers`` model so ``model(input_ids)`` returns the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """The wrapped model's own checkpointing (``activation_checkpointing_enable`` in transformers >= 5)."""
        new = getattr(self.model, "activation_checkpointing_enable", None)
        if callable(new):
            new(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if getattr(self.model.config, "use_cache", None):
            self.model.config.use_cache = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def _token_loss_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum", ignore_index=-100)


def _cls_loss_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction="sum")


def _adamw(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def _config(arch: str, seq_len: int) -> Any:
    tf = _require()
    if arch == "gpt2":
        cfg = tf.GPT2Config()
        cfg.n_positions = max(cfg.n_positions, seq_len)
    elif arch in ("bert-base", "bert-large"):
        cfg = tf.BertConfig(**(BERT_LARGE if arch == "bert-large" else {}))
        cfg.max_position_embeddings = max(cfg.max_position_embeddings, seq_len)
    else:
        path = Path(arch)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise BatchpilotError(f"hf: {arch!r} is neither gpt2, bert-base, bert-large nor a config.json file")
        try:
            data = json.loads(path.read_text())
            cfg = tf.AutoConfig.for_model(**data)
        except Exception as exc:  # noqa: BLE001 - report any bad config in one line
            raise BatchpilotError(f"hf: cannot build a config from {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    cfg._attn_implementation = "sdpa"
    return cfg


def _max_positions(cfg: Any) -> int | None:
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def hf_workload(arch: str, head: str | None = None, seq_len: int | None = None, num_labels: int = 2) -> Workload:
    """A memory-only workload for a ``transformers`` architecture built from its config.

    Args:
        arch: ``gpt2``, ``bert-base``, ``bert-large`` or a path to a ``config.json`` (or its folder).
        head: ``lm`` or ``cls`` (default: ``lm`` for decoder models, ``cls`` for encoders).
        seq_len: tokens per sample (default 1024 for GPT-2, 512 for BERT, else the config's maximum).
        num_labels: classes of the ``cls`` head.

    Raises:
        BatchpilotError: transformers missing, unknown arch/head, bad seq_len or config.
    """
    tf = _require()
    is_decoder = arch == "gpt2"
    cfg = _config(arch, seq_len or 0)
    if arch not in ("gpt2", "bert-base", "bert-large"):
        is_decoder = cfg.model_type in ("gpt2", "gpt_neo", "gptj", "llama", "mistral", "opt", "gpt_neox", "qwen2", "phi")
    head = head or ("lm" if is_decoder else "cls")
    if head not in HEADS:
        raise BatchpilotError(f"hf head must be one of {', '.join(HEADS)}, got {head!r}")
    max_pos = _max_positions(cfg)
    s = seq_len if seq_len is not None else min(1024 if is_decoder else 512, max_pos or 1024)
    if isinstance(s, bool) or not isinstance(s, int) or s < 2:
        raise BatchpilotError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if max_pos is not None and s > max_pos:
        raise BatchpilotError(f"seq_len {s} exceeds the config's maximum positions {max_pos}")
    if head == "cls":
        cfg.num_labels = num_labels
        auto = tf.AutoModelForSequenceClassification
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = 0
    else:
        auto = tf.AutoModelForCausalLM if is_decoder else tf.AutoModelForMaskedLM

    def make_model() -> nn.Module:
        return HFLogits(auto.from_config(cfg, attn_implementation="sdpa"))

    g = torch.Generator().manual_seed(0)
    vocab = int(cfg.vocab_size)
    ids = torch.randint(0, vocab, (NUM_ITEMS, s + 1), generator=g)
    if head == "lm":
        x = ids[:, :-1].clone()
        y = ids[:, 1:].clone() if is_decoder else ids[:, :-1].clone()
        loss, units = _token_loss_sum, count_tokens
    else:
        x, y = ids[:, :-1].clone(), torch.randint(0, num_labels, (NUM_ITEMS,), generator=g)
        loss, units = _cls_loss_sum, None
    name = f"hf:{arch}" + (f"[{head}]" if head != ("lm" if is_decoder else "cls") else "")
    base_batch, base_lr = (8, 6e-4) if is_decoder else (32, 1e-4)
    data = TensorDataset(x, y)
    kwargs: dict[str, Any] = {"count_units": units} if units is not None else {}
    return Workload(
        name=name, make_model=make_model, train_data=data, val_data=data, loss_sum=loss, metric_sum=loss,
        metric_name="val_loss", higher_is_better=False, make_optimizer=_adamw, base_batch=base_batch,
        base_lr=base_lr, description=f"memory-only {arch} ({head} head) from its config, {s} tokens", seq_len=s, memory_only=True,
        **kwargs,
    )


def load_hf_workload(spec: str, **options: Any) -> Workload:
    """``hf:gpt2`` / ``hf:bert-base`` / ``hf:bert-large`` / ``hf:path/config.json`` -> :func:`hf_workload`."""
    if not spec.startswith("hf:") or len(spec) <= 3:
        raise BatchpilotError(f"an hf workload looks like 'hf:gpt2' or 'hf:path/config.json', got {spec!r}")
    return hf_workload(spec[3:], **options)


def _factory(arch: str):
    def make(head: str | None = None, seq_len: int | None = None, num_labels: int = 2) -> Workload:
        return hf_workload(arch, head=head, seq_len=seq_len, num_labels=num_labels)

    make.__name__ = f"hf_{arch.replace('-', '_')}"
    return make


_ONLY = "memory-only, random tokens (needs the hf extra: transformers)"
for _arch, _desc in (("gpt2", f"GPT-2 small (124M) from its config, 1024 tokens, AdamW; {_ONLY}"),
                     ("bert-base", f"BERT-base from its config, 512 tokens, cls head, AdamW; {_ONLY}"),
                     ("bert-large", f"BERT-large from its config, 512 tokens, cls head, AdamW; {_ONLY}")):
    register(f"hf:{_arch}", _desc)(_factory(_arch))
