"""Training methods. Each module registers itself with ``@register_method``."""

from accel_distill.methods import consistency, dmd2, finetune, kd  # noqa: F401
