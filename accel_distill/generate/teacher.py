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
from accel_distill.trajectory import path_point

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
    """A run config of the ``teacher`` role, checked by the family before any weights load.

    ``recipe.method`` is ``kd``, the method that reads what generation writes, with its ``student`` role on the
    same model (only so that student timesteps are fitted as a kd run fits them); nothing of it runs here.
    """
    load_builtins()
    role = RoleConfig(path=model, revision=revision, precision=PRECISIONS[dtype])
    cfg = RunConfig(
        recipe=RecipeConfig(family=family, method="kd"),
        roles={ROLE: role, "student": RoleConfig(path=model, revision=revision, trainable=True)},
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
        self,
        noise: torch.Tensor,
        cond: Conditioning,
        neg: Conditioning | None,
        guidance: float,
        *,
        steps: Sequence[int] = (),
        at: Sequence[float] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(final x0 ``[B, C, T, H, W]``, trajectory ``[B, S, C, T, H, W]``), model space, float32.

        The trajectory holds the samples steps ``steps`` start from, or the samples at timesteps ``at``
        (each on the path of the teacher's step across it, :func:`accel_distill.trajectory.path_point`).
        """
        wanted, kept, found, last = set(steps), {}, {}, {}

        def cross(t_b: float, x_b: torch.Tensor) -> None:  # the step from the last sample to x_b at t_b
            def full(v: float) -> torch.Tensor:
                return torch.full((x_b.shape[0],), v, device=x_b.device)

            for k, tau in enumerate(at):
                if k not in found and t_b < tau <= last["t"]:
                    found[k] = path_point(self.adapter.noise, last["x"], full(last["t"]), x_b, full(t_b), full(tau))

        def keep(i: int, t: torch.Tensor, x: torch.Tensor) -> None:
            x = x.float()
            if i in wanted:
                kept[i] = x.clone()
            if at:
                if last:
                    cross(self.schedule.timesteps[i], x)
                last.update(t=self.schedule.timesteps[i], x=x.clone())

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.adapter.predict_cfg(self.role, x, t, cond, neg, guidance)

        x0 = self.adapter.noise.sample(predict, self.schedule, noise.to(self.device), on_step=keep).float()
        if at:
            cross(0.0, x0)
        traj = [kept[i] for i in steps] if steps else [found[k] for k in range(len(at))]
        return x0, torch.stack(traj, dim=1)


def teacher_schedule(noise, steps: int) -> StockSchedule:
    """The noise schedule's many-step scheduler at ``steps`` steps; ConfigError if it cannot make them."""
    schedule = with_step_count(noise.many_step_schedule(), steps)
    if schedule is None or len(schedule.timesteps) != steps:
        raise ConfigError(f"--steps {steps}: the teacher's scheduler cannot produce {steps} finite timesteps")
    return schedule
