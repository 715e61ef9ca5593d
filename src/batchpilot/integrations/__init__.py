"""Integrations with the training loops users already have.

* :mod:`batchpilot.integrations.lightning` - ``BatchpilotCallback`` for PyTorch Lightning
  (``pip install 'batchpilot[lightning]'``);
* :mod:`batchpilot.integrations.hf` - a ``TrainerCallback`` and plan helpers for the Hugging Face
  Trainer and accelerate (``pip install 'batchpilot[hf]'``).

This package imports neither framework; import the submodule you need. The shared pieces
(:func:`~batchpilot.integrations.plan.load_plan`, the per-micro-batch gradient recorder) need
only torch.
"""

from batchpilot.integrations.plan import PlanSettings, load_plan

__all__ = ["PlanSettings", "load_plan"]
