"""The algorithm-agnostic training loop and its callbacks."""

from accel_distill.trainer.callbacks import Callback
from accel_distill.trainer.loop import Trainer, TrainerState, TrainingDiverged

__all__ = ["Callback", "Trainer", "TrainerState", "TrainingDiverged"]
