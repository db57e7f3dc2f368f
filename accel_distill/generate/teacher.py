"""The teacher for data generation: a frozen role loaded by its family, sampled by the project's sampler.

The family loads the transformer(s) and builds the adapter exactly as for a training run's
``teacher`` role (a minimal :class:`RunConfig` with that one role), so expert routing,
latent normalisation and CFG are the training path's. Sampling is
:meth:`NoiseSchedule.sample` over the noise schedule's many-step scheduler (rectified
flow: ``FlowMatchEulerDiscreteScheduler`` at the flow shift; DDPM: DDIM) at ``steps``
steps, with an ``on_step`` hook that keeps the samples of the saved steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from accel_distill.config.schema import PipelineConfig, RecipeConfig, RoleConfig, RunConfig, TrainingConfig
from accel_distill.errors import ConfigError
from accel_distill.families.base import Conditioning, ModelAdapter
from accel_distill.registry import FAMILIES, load_builtins
from accel_distill.roles import RoleHandle, apply_trainable
from accel_distill.schedule import StockSchedule, with_step_count

ROLE = "teacher"
PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def teacher_config(
    family: str,
    model: str,
    *,
    revision: str | None,
    dtype: torch.dtype,
    flow_shift: float | None,
    text_max_length: int,
    output: str,
) -> RunConfig:
    """A run config holding only the ``teacher`` role, checked by the family before any weights load.

    ``recipe.method`` is ``kd``, the method that reads what generation writes; nothing of it runs here.
    """
    load_builtins()
    cfg = RunConfig(
        recipe=RecipeConfig(family=family, method="kd"),
        roles={ROLE: RoleConfig(path=model, revision=revision, precision=PRECISIONS[dtype])},
        training=TrainingConfig(output_dir=output, data_path=output),
        pipeline_config=PipelineConfig(flow_shift=flow_shift, text_max_length=text_max_length),
        method_config=None,
        source=f"generate --model {model}",
    )
    family_cls = FAMILIES[family]
    family_cls.validate_config(cfg)
    extra = family_cls.extra_tensor_columns(cfg)
    if extra:
        raise ConfigError(
            f"--family {family}: the model also needs per-row conditioning ({', '.join(extra)}), which a prompt "
            "does not give; generate supports text-conditioned families"
        )
    return cfg


def teacher_adapter(cfg: RunConfig) -> ModelAdapter:
    """The teacher's adapter (noise schedule, latent normalisation, routing), from its configs alone."""
    return FAMILIES[cfg.recipe.family](cfg).make_adapter(ROLE)


class Teacher:
    """The loaded teacher role, its adapter and its ``steps``-step sampling schedule."""

    def __init__(self, cfg: RunConfig, *, steps: int, device: torch.device):
        family = FAMILIES[cfg.recipe.family](cfg)
        rc = cfg.roles[ROLE]
        dtype = {v: k for k, v in PRECISIONS.items()}[rc.precision]
        modules = {k: apply_trainable(m, False).to(device) for k, m in family.load_module(ROLE, rc, dtype).items()}
        self.role = RoleHandle(ROLE, modules, False, dtype, source=rc.path)
        self.adapter = teacher_adapter(cfg)
        self.device = device
        self.schedule = teacher_schedule(self.adapter.noise, steps)

    @property
    def timesteps(self) -> torch.Tensor:
        return torch.tensor(self.schedule.timesteps, dtype=torch.float32)

    @torch.no_grad()
    def sample(
        self, noise: torch.Tensor, cond: Conditioning, neg: Conditioning | None, guidance: float, save: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(final x0 ``[B, C, T, H, W]``, samples of steps ``save`` ``[B, S, C, T, H, W]``), model space, float32."""
        wanted, kept = set(save), {}

        def keep(i: int, t: torch.Tensor, x: torch.Tensor) -> None:
            if i in wanted:
                kept[i] = x.float().clone()

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.adapter.predict_cfg(self.role, x, t, cond, neg, guidance)

        x0 = self.adapter.noise.sample(predict, self.schedule, noise.to(self.device), on_step=keep)
        return x0.float(), torch.stack([kept[i] for i in save], dim=1)


def teacher_schedule(noise, steps: int) -> StockSchedule:
    """The noise schedule's many-step scheduler at ``steps`` steps; ConfigError if it cannot make them."""
    schedule = with_step_count(noise.many_step_schedule(), steps)
    if schedule is None or len(schedule.timesteps) != steps:
        raise ConfigError(f"--steps {steps}: the teacher's scheduler cannot produce {steps} finite timesteps")
    return schedule
