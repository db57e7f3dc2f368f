"""accel_distill: distill and finetune video diffusion models into few-step students."""

__version__ = "0.1.0"
