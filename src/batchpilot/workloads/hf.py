"""Hugging Face ``transformers`` models as workloads, built from a config with no download.

Specs (``--workload``):

* ``hf:gpt2`` (GPT-2 small, ``GPT2Config()``), ``hf:bert-base`` (``BertConfig()``), ``hf:bert-large``
  (``BertConfig`` with hidden 1024, 24 layers, 16 heads, intermediate 4096) and ``hf:llama``
  (``LlamaConfig()``: the Llama-7B shape);
* ``hf:path/to/config.json`` (or its folder): any config ``AutoConfig.for_model`` builds;
* ``hf-tiny-gpt2`` and ``hf-tiny-bert``: tiny built-ins that train on this CPU in seconds.

Options (``--workload-opt KEY=VALUE``, or keyword arguments of :func:`hf_workload`):

* ``seq_len``: tokens per sample; ``head``: ``lm`` (causal LM for decoders, masked LM for encoders) or
  ``cls`` (sequence classification, ``num_labels`` classes);
* ``data``: ``random`` (random tokens: memory-only), ``stdlib`` (Python's own standard-library source,
  the text ``charlm`` trains on), ``generated`` (a generated classification task, ``cls`` only), or a
  path to a text file or a directory of text files. Text is tokenized as bytes (a 256-token
  vocabulary): nothing to download. With ``head=cls`` a directory is one class per file;
* any field of the model's config (``n_layer=2``, ``n_embd=64``, ``hidden_size=128``, ``vocab_size=...``);
* ``num_train``/``num_val`` (generated data), ``val_fraction`` (text), ``base_batch``, ``base_lr``,
  ``target`` (e.g. ``val_loss<=2.0``).

**Trainable or memory-only.** A spec with neither ``data`` nor a config field is the full-size model
on random tokens: memory-only (``batchpilot memory`` traces it; ``train``/``plan``/``sweep`` refuse it
with a message saying how to train it). Give ``data=`` (any size) or a size (``n_layer=2`` ...) and it
trains: on ``stdlib`` text for an ``lm`` head, on the generated task for a ``cls`` head. A trainable
model built from one of the names above uses the 256-token byte vocabulary unless ``vocab_size`` is
given; a config file keeps its own ``vocab_size``.

The data helpers (text windows, the generated task, random tokens) live in :mod:`batchpilot.workloads.hf_data`.

Batches are counted in sequences; an ``lm`` head's loss unit is the token. ``transformers`` is imported
only when a workload is built (the optional extra ``pip install batchpilot[hf]``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from batchpilot.errors import BatchpilotError
from batchpilot.workloads.hf_data import (  # noqa: F401 - re-exported: the data helpers' public names
    BYTE_VOCAB, DATA_KINDS, FIRST_NOISE_TOKEN, MARKERS, MAX_MARKERS, NUM_ITEMS, cls_text_data, generated_cls_data,
    lm_text_data, random_tokens, read_text_bytes)
from batchpilot.workloads.spec import Target, Workload, count_tokens, register

HEADS = ("lm", "cls")
BERT_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
ARCHES = ("gpt2", "bert-base", "bert-large", "llama")
DECODER_TYPES = ("gpt2", "gpt_neo", "gptj", "llama", "mistral", "opt", "gpt_neox", "qwen2", "qwen3", "phi", "phi3",
                 "gemma", "gemma2", "falcon", "mixtral")
WORKLOAD_KEYS = ("head", "seq_len", "num_labels", "data", "num_train", "num_val", "val_fraction", "base_batch",
                 "base_lr", "target")
"""Options of the workload itself; every other option is a field of the model's config."""


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
        raise BatchpilotError("hf workloads need the optional extra: pip install 'batchpilot[hf]' (transformers)") from exc
    return transformers


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings while configs and models are built (they go to stderr otherwise)."""
    tf = _require()
    logging = tf.utils.logging
    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


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


def token_loss_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over tokens (ignore index -100)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum", ignore_index=-100)


def cls_loss_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over sequences."""
    return F.cross_entropy(logits, target, reduction="sum")


def correct_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Correct top-1 predictions."""
    return (logits.argmax(dim=-1) == target).sum()


def _adamw(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


# ---------------------------------------------------------------- configs


def _config_class_and_data(arch: str) -> tuple[Callable[..., Any], dict[str, Any], bool]:
    """How to build the config of ``arch``: a constructor, its base keyword arguments, and whether from a file."""
    tf = _require()
    if arch == "gpt2":
        return tf.GPT2Config, {}, False
    if arch in ("bert-base", "bert-large"):
        return tf.BertConfig, dict(BERT_LARGE) if arch == "bert-large" else {}, False
    if arch == "llama":
        return tf.LlamaConfig, {}, False
    path = Path(arch)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise BatchpilotError(f"hf: {arch!r} is neither {', '.join(ARCHES)} nor a config.json file")
    try:
        data = json.loads(path.read_text())
    except Exception as exc:  # noqa: BLE001 - report any bad file in one line
        raise BatchpilotError(f"hf: cannot read a config from {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict):
        raise BatchpilotError(f"hf: {str(path)!r} does not hold a JSON object")
    return tf.AutoConfig.for_model, data, True


def build_config(arch: str, overrides: dict[str, Any] | None = None, *, byte_vocab: bool = False) -> tuple[Any, bool]:
    """The config of ``arch`` with ``overrides`` applied, and whether it came from a file.

    The overrides go through the config's constructor, so derived fields follow (Llama's ``head_dim`` and
    ``num_key_value_heads`` from a new width and head count). Keys that are not fields of the config fail.
    ``byte_vocab`` sets ``vocab_size`` to 256 unless the overrides or a config file give one.
    """
    make, base, from_file = _config_class_and_data(arch)
    overrides = dict(overrides or {})
    with _quiet_transformers():
        try:
            default = make(**base)
        except Exception as exc:  # noqa: BLE001
            raise BatchpilotError(f"hf: cannot build a config from {arch!r}: {type(exc).__name__}: {exc}") from exc
        known = config_fields(default)
        for key in overrides:
            if key not in known:
                sizes = sorted(k for k in known if any(t in k for t in _SIZE_HINTS))
                raise BatchpilotError(f"hf:{arch}: unknown option {key!r}: expected a workload option "
                                      f"({', '.join(WORKLOAD_KEYS)}) or a field of its {type(default).__name__} "
                                      f"(size fields: {', '.join(sizes)})")
        for key, value in overrides.items():  # a negative size builds, then fails deep in torch (len() < 0)
            if (isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0
                    and any(t in key for t in _SIZE_HINTS)):
                raise BatchpilotError(f"hf:{arch}: {key} is a size: it must be >= 0, got {value!r}")
        if byte_vocab and not from_file and "vocab_size" not in overrides:
            overrides["vocab_size"] = BYTE_VOCAB
        aliases = getattr(default, "attribute_map", {}) or {}
        kwargs = {**base, **{aliases.get(k, k): v for k, v in overrides.items()}}
        if "num_attention_heads" in overrides and "num_key_value_heads" in known and "num_key_value_heads" not in overrides:
            kwargs.pop("num_key_value_heads", None)  # follows the new head count (multi-head), as the constructor does
        if "head_dim" in known and "head_dim" not in overrides:
            kwargs.pop("head_dim", None)  # derived from the width and the head count
        try:
            return make(**kwargs), from_file
        except Exception as exc:  # noqa: BLE001 - one line
            raise BatchpilotError(f"hf:{arch}: bad config options: {type(exc).__name__}: {exc}") from exc


_SIZE_HINTS = ("layer", "embd", "hidden", "head", "intermediate", "inner", "position", "vocab")
"""Substrings of a config field's name that make it a size (listed in errors; never negative)."""


def config_fields(cfg: Any) -> set[str]:
    """The option names that set a field of ``cfg`` (its own fields and their aliases, e.g. GPT-2's ``hidden_size``)."""
    return set(cfg.to_dict()) | set(getattr(cfg, "attribute_map", {}) or {})


def _max_positions(cfg: Any) -> int | None:
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _set_max_positions(cfg: Any, value: int) -> None:
    for key in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(cfg, key, None), int):
            setattr(cfg, key, value)
            return


def _fit_special_tokens(cfg: Any) -> None:
    """Special token ids inside a (smaller) vocabulary; out-of-range ones become ``None`` (0 for padding)."""
    vocab = int(cfg.vocab_size)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "cls_token_id"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not 0 <= value < vocab:
            setattr(cfg, key, None)



# ---------------------------------------------------------------- the workload


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BatchpilotError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def hf_workload(arch: str, head: str | None = None, seq_len: int | None = None, num_labels: int = 2,
                data: str | None = None, num_train: int = 4096, num_val: int = 1024, val_fraction: float = 0.1,
                base_batch: int | None = None, base_lr: float | None = None, target: str | None = None,
                name: str | None = None, description: str | None = None, **config: Any) -> Workload:
    """A workload for a ``transformers`` architecture built from its config (see the module doc).

    Args:
        arch: ``gpt2``, ``bert-base``, ``bert-large``, ``llama`` or a path to a ``config.json`` (or its folder).
        head: ``lm`` or ``cls`` (default: ``lm`` for decoders, ``cls`` for encoders).
        seq_len: tokens per sample (default 1024 for decoders, 512 for encoders, at most the config's maximum;
            GPT-2 and BERT built from their names grow their position table to fit a longer one).
        num_labels: classes of the ``cls`` head (the generated task has 2).
        data: ``random``, ``stdlib``, ``generated`` or a text file/directory (default: ``random`` when no config
            field is given, else ``stdlib`` for ``lm`` and ``generated`` for ``cls``).
        num_train, num_val: sizes of the generated task.
        val_fraction: share of the text that validates.
        base_batch, base_lr: the tuned point (default 8 / 6e-4 for decoders, 32 / 1e-4 for encoders).
        target: e.g. ``val_loss<=2.0``.
        name, description: override the workload's name and description (built-ins).
        **config: fields of the model's config (``n_layer=2``, ``hidden_size=64`` ...).

    Raises:
        BatchpilotError: transformers missing, unknown arch/head/option, bad seq_len, data or config.
    """
    tf = _require()
    spec = f"hf:{arch}"
    if data is not None and not isinstance(data, str):
        raise BatchpilotError(f"data must be {', '.join(DATA_KINDS)} or a path, got {data!r}")
    trainable = (data is not None and data != "random") or bool(config)
    cfg, from_file = build_config(arch, config, byte_vocab=trainable)
    is_decoder = bool(cfg.model_type in DECODER_TYPES or getattr(cfg, "is_decoder", False))
    head = head or ("lm" if is_decoder else "cls")
    if head not in HEADS:
        raise BatchpilotError(f"hf head must be one of {', '.join(HEADS)}, got {head!r}")
    data = data or ("random" if not trainable else "stdlib" if head == "lm" else "generated")
    if data == "generated" and head != "cls":
        raise BatchpilotError("data=generated is a classification task: it needs head=cls")
    vocab = _check_int("vocab_size", getattr(cfg, "vocab_size", None), 2)
    _fit_special_tokens(cfg)
    max_pos = _max_positions(cfg)
    s = seq_len if seq_len is not None else min(1024 if is_decoder else 512, max_pos or 1024)
    s = _check_int("seq_len", s, 2)
    if max_pos is not None and s > max_pos:
        grows = not from_file and not ({"n_positions", "max_position_embeddings"} & set(config)) and arch != "llama"
        if not grows:
            raise BatchpilotError(f"seq_len {s} exceeds the config's maximum positions {max_pos}")
        _set_max_positions(cfg, s)
    num_labels = _check_int("num_labels", num_labels, 2)
    if not 0 < val_fraction < 0.5:
        raise BatchpilotError(f"val_fraction must be in (0, 0.5), got {val_fraction!r}")
    cfg._attn_implementation = "sdpa"

    metric_name, higher, metric_sum, units, data_desc = "val_loss", False, None, None, ""
    if data == "random":
        train = val = random_tokens(s, vocab, head, is_decoder, num_labels)
    elif head == "lm":
        train, val, data_desc = lm_text_data(data, s, vocab, is_decoder=is_decoder, val_fraction=val_fraction)
    elif data == "generated":
        num_labels = 2
        train = generated_cls_data(_check_int("num_train", num_train, 1), s, vocab, seed=0)
        val = generated_cls_data(_check_int("num_val", num_val, 1), s, vocab, seed=1)
        data_desc = f"generated marker-majority task, {len(train)} train / {len(val)} val sequences"
    else:
        train, val, num_labels, data_desc = cls_text_data(data, s, vocab, val_fraction=val_fraction)
    if head == "cls":
        cfg.num_labels = num_labels
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = 0
        auto = tf.AutoModelForSequenceClassification
        loss: Callable = cls_loss_sum
        if data != "random":
            metric_name, higher, metric_sum = "val_acc", True, correct_sum
    else:
        auto = tf.AutoModelForCausalLM if is_decoder else tf.AutoModelForMaskedLM
        loss, units = token_loss_sum, count_tokens
    params = _validate_model(auto, cfg, spec)

    def make_model() -> nn.Module:
        with _quiet_transformers():
            return HFLogits(auto.from_config(cfg, attn_implementation="sdpa"))

    default_name = spec + (f"[{head}]" if head != ("lm" if is_decoder else "cls") else "")
    b0, lr0 = (8, 6e-4) if is_decoder else (32, 1e-4)
    b0 = _check_int("base_batch", base_batch, 1) if base_batch is not None else b0
    lr0 = float(base_lr) if base_lr is not None else lr0
    size = f"{params / 1e6:.1f}M params" if params >= 1e5 else f"{params / 1e3:.0f}k params"
    if data == "random":
        desc = (f"{arch} ({head} head, {size}) on random tokens, {s} tokens; to train it give "
                f"data=stdlib|PATH or a smaller size (e.g. {_size_hint(cfg)}), or use hf-tiny-gpt2 / hf-tiny-bert")
    else:
        desc = f"{arch} ({head} head, {size}, vocab {vocab}), {s} tokens, on {data_desc}, AdamW"
    options = {"head": head, "seq_len": seq_len, "num_labels": num_labels, "data": data, "num_train": num_train,
               "num_val": num_val, "val_fraction": val_fraction, "base_batch": base_batch, "base_lr": base_lr,
               "target": target, "name": name, "description": description, **config}

    def rebuild(**changes: Any) -> Workload:
        return hf_workload(arch, **{**options, **changes})

    kwargs: dict[str, Any] = {"count_units": units} if units is not None else {}
    return Workload(
        name=name or default_name, make_model=make_model, train_data=train, val_data=val, loss_sum=loss,
        metric_sum=metric_sum or loss, metric_name=metric_name, higher_is_better=higher, make_optimizer=_adamw,
        base_batch=b0, base_lr=lr0, description=description or desc, seq_len=s, memory_only=data == "random",
        target=Target.parse(target) if target else None, rebuild=rebuild, **kwargs,
    )


def _size_hint(cfg: Any) -> str:
    if cfg.model_type == "gpt2":
        return "n_layer=2,n_embd=64,n_head=4"
    return "num_hidden_layers=2,hidden_size=64,num_attention_heads=4,intermediate_size=128"


def _validate_model(auto: Any, cfg: Any, spec: str) -> int:
    """Build the model on the meta device once (a bad config fails here in one line, not mid-plan);
    return its parameter count (tied weights once)."""
    try:
        with torch.device("meta"), _quiet_transformers():
            model = auto.from_config(cfg, attn_implementation="sdpa")
    except Exception as exc:  # noqa: BLE001 - any config error, one line
        raise BatchpilotError(f"{spec}: the config does not build a model: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def load_hf_workload(spec: str, **options: Any) -> Workload:
    """``hf:gpt2`` / ``hf:bert-base`` / ``hf:bert-large`` / ``hf:llama`` / ``hf:path/config.json`` -> :func:`hf_workload`."""
    if not spec.startswith("hf:") or len(spec) <= 3:
        raise BatchpilotError(f"an hf workload looks like 'hf:gpt2' or 'hf:path/config.json', got {spec!r}")
    return hf_workload(spec[3:], **options)


def hf_factory(spec: str) -> Callable[..., Workload]:
    """The factory :func:`batchpilot.workloads.get_workload` calls for an ``hf:...`` spec that is not registered."""

    def make(**options: Any) -> Workload:
        return load_hf_workload(spec, **options)

    return make


def _factory(arch: str) -> Callable[..., Workload]:
    def make(**options: Any) -> Workload:
        return hf_workload(arch, **options)

    make.__name__ = f"hf_{arch.replace('-', '_')}"
    return make


_SIZE = ("memory-only at this size (random tokens); trains with data=stdlib|PATH or a size option "
         "(needs the hf extra: transformers)")
for _arch, _what in (("gpt2", "GPT-2 small (124M) from its config, 1024 tokens, lm head"),
                     ("bert-base", "BERT-base (110M) from its config, 512 tokens, cls head"),
                     ("bert-large", "BERT-large (335M) from its config, 512 tokens, cls head"),
                     ("llama", "Llama-7B shape (LlamaConfig()), 1024 tokens, lm head")):
    register(f"hf:{_arch}", f"{_what}, AdamW; {_SIZE}")(_factory(_arch))

TINY_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 4, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
TINY_BERT = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "vocab_size": 64}
TINY_GPT2_DESC = ("tiny GPT-2 (transformers, 2 layers, 64 wide, byte vocabulary) on Python's stdlib source, 64 tokens, "
                  "AdamW; base batch 32, LR 2e-3; target val_loss<=2.3 (needs the hf extra)")
TINY_BERT_DESC = ("tiny BERT classifier (transformers, 2 layers, 64 wide) on a generated marker-majority task, "
                  "64 tokens, AdamW; base batch 32, LR 1e-3; target val_acc>=0.97 (needs the hf extra)")


@register("hf-tiny-gpt2", TINY_GPT2_DESC)
def hf_tiny_gpt2(**options: Any) -> Workload:
    """Tiny GPT-2 on stdlib text: trains on a CPU in the test suite. Options as :func:`hf_workload`'s."""
    merged = {"seq_len": 64, "base_batch": 32, "base_lr": 2e-3, "target": "val_loss<=2.3", "data": "stdlib",
              **TINY_GPT2, **options}
    return hf_workload("gpt2", name="hf-tiny-gpt2", description=TINY_GPT2_DESC, **merged)


@register("hf-tiny-bert", TINY_BERT_DESC)
def hf_tiny_bert(**options: Any) -> Workload:
    """Tiny BERT classifier on the generated task. Options as :func:`hf_workload`'s."""
    merged = {"seq_len": 64, "head": "cls", "base_batch": 32, "base_lr": 1e-3, "target": "val_acc>=0.97",
              "data": "generated", **TINY_BERT, **options}
    return hf_workload("bert-base", name="hf-tiny-bert", description=TINY_BERT_DESC, **merged)


__all__ = ["HFLogits", "hf_workload", "load_hf_workload", "hf_factory", "transformers_available", "config_fields",
           "generated_cls_data", "lm_text_data", "read_text_bytes"]
