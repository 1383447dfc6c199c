"""Training: one loop function, objectives, optimizers and schedules, EMA, resumable data, training state."""
from polymodal.train.data import IndexedBatches, ShuffledBatches
from polymodal.train.ema import EMA
from polymodal.train.loop import NonFiniteLossError, StepContext, TrainConfig, TrainResult, every, train
from polymodal.train.optim import Optimization

__all__ = ["EMA", "IndexedBatches", "NonFiniteLossError", "Optimization", "ShuffledBatches", "StepContext",
           "TrainConfig", "TrainResult", "every", "train"]
