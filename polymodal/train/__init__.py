"""Training: one loop function, optimizers and schedules, resumable data, training state."""
from polymodal.train.data import IndexedBatches, ShuffledBatches
from polymodal.train.loop import NonFiniteLossError, TrainConfig, TrainResult, train

__all__ = ["IndexedBatches", "NonFiniteLossError", "ShuffledBatches", "TrainConfig", "TrainResult", "train"]
