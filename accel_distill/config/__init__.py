"""Run configuration: schema, strict validation, YAML loading with dotted overrides."""

from accel_distill.config.loader import load_config, resolved_dict
from accel_distill.config.schema import PipelineConfig, RecipeConfig, RoleConfig, RunConfig, TrainingConfig

__all__ = [
    "load_config",
    "resolved_dict",
    "PipelineConfig",
    "RecipeConfig",
    "RoleConfig",
    "RunConfig",
    "TrainingConfig",
]
