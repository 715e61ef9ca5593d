"""Training: the reference loop and the building blocks for users' own loops."""

from batchpilot.train.accumulation import accumulate_gradients
from batchpilot.train.config import TrainConfig
from batchpilot.train.loop import Trainer, evaluate, train
from batchpilot.train.result import TrainResult

__all__ = ["TrainConfig", "TrainResult", "Trainer", "accumulate_gradients", "evaluate", "train"]
