"""batchpilot: choose the best batch size, LR, warmup and accumulation from measurements."""

from batchpilot.errors import BatchpilotError
from batchpilot.workloads import Workload, get_workload, list_workloads

__all__ = ["BatchpilotError", "Workload", "get_workload", "list_workloads"]
__version__ = "0.1.0"
