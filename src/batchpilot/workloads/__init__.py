"""Workloads: the spec (:mod:`.spec`), lookup and user loader (:mod:`.registry`), batch helpers
(:mod:`.data`) and the built-ins (``mnist1d``, ``digits``, ``charlm``), which register on import."""

from batchpilot.workloads.registry import get_workload, list_workloads
from batchpilot.workloads.spec import REGISTRY, Target, Workload, count_samples, count_tokens, register

__all__ = ["REGISTRY", "Target", "Workload", "count_samples", "count_tokens", "get_workload", "list_workloads",
           "register"]
