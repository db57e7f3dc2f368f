"""The algorithm-agnostic training loop."""

from accel_distill.trainer.loop import Trainer, TrainerState, TrainingDiverged

__all__ = ["Trainer", "TrainerState", "TrainingDiverged"]
