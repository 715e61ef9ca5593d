"""``hf:`` workloads for memory prediction: kept here for the imports that name this module.

The workloads themselves (GPT-2, BERT, Llama built from configs, memory-only at full size and
trainable with data or a smaller size) live in :mod:`batchpilot.workloads.hf`, which registers
``hf:gpt2``, ``hf:bert-base``, ``hf:bert-large``, ``hf:llama``, ``hf-tiny-gpt2`` and ``hf-tiny-bert``.
"""

from __future__ import annotations

from batchpilot.workloads.hf import (  # noqa: F401  (re-exported; importing registers the hf workloads)
    BERT_LARGE,
    HEADS,
    NUM_ITEMS,
    HFLogits,
    hf_factory,
    hf_workload,
    load_hf_workload,
    transformers_available,
)

__all__ = ["BERT_LARGE", "HEADS", "NUM_ITEMS", "HFLogits", "hf_factory", "hf_workload", "load_hf_workload",
           "transformers_available"]
