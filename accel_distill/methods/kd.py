"""Knowledge distillation on stored teacher trajectories (Luhman & Luhman 2021; FastVideo's KD).

Data: rows written by ``python -m accel_distill.generate``: the latent is the teacher's final x0,
``traj_latents`` [S, C, T, H, W] the samples its saved steps started from (model space) and
``traj_timesteps`` [S] their timesteps. No teacher runs during training.

Each sample draws one of the student's few steps ``t_i``. Its input is the teacher's sample at
``t_i``: the stored one when ``t_i`` is a stored timestep, else the point between the two stored
neighbours on the deterministic (DDIM / Euler) path through them -- with a rectified flow, the
straight line in sigma that the teacher's Euler step took, exact when consecutive teacher steps are
stored (the default: all). Below the last stored step the clean end (the final x0) is the neighbour.
The target is the teacher's final x0 (``target: x0``) or the x0 that carries ``x_{t_i}`` to the
teacher's sample at ``t_{i+1}`` in one deterministic step (``target: next``; at the last step that is
the final x0). The loss is 0.5 * MSE in the family's native prediction space (``loss_space: native``,
the flow for rectified flow) or on x0. The export's stock scheduler samples exactly ``t_i``, as DMD2's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from accel_distill.config.schema import RunConfig
from accel_distill.config.validate import check_range, fail
from accel_distill.data.schema import TRAJ_LATENTS, TRAJ_TIMESTEPS
from accel_distill.errors import DataError
from accel_distill.methods.base import DistillMethod, student_schedule
from accel_distill.registry import register_method
from accel_distill.schedule import StockSchedule
from accel_distill.trajectory import broadcast, path_coefficients, path_x0, trajectory_point

WRITER = "teacher trajectories, written by `python -m accel_distill.generate`"


@dataclass
class KDConfig:
    # The student's timesteps (a trailing 0 marks the clean end and is dropped); FastVideo's KD t_list.
    kd_denoising_steps: list[float] = field(default_factory=lambda: [1000.0, 937.0, 833.0, 624.0])
    # "x0": regress the teacher's final x0; "next": the x0 of one deterministic step to the teacher's t_{i+1} point.
    target: Literal["x0", "next"] = "x0"
    # "native": the network's own prediction (flow for rectified flow); "x0": the clean latent.
    loss_space: Literal["native", "x0"] = "native"
    # How far (in timestep units) the exported scheduler may miss a requested step.
    step_tolerance: float = 1.0


def kd_loss(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, target_x0: torch.Tensor, noise, space: str):
    """0.5 * MSE of the student's native prediction ``pred`` at ``x_t`` against the (detached) target x0,
    in the native space (the prediction that implies ``target_x0``) or on x0."""
    target_x0 = target_x0.detach().float()
    if space == "native":
        return 0.5 * F.mse_loss(pred.float(), noise.from_x0(target_x0, x_t, t).detach())
    return 0.5 * F.mse_loss(noise.to_x0(pred.float(), x_t, t), target_x0)


@register_method("kd")
class KDMethod(DistillMethod):
    """The student regresses the teacher's trajectory at its own few steps (one trainable role, no teacher)."""

    config_class = KDConfig
    required_roles = ("student",)
    role_trainable = {"student": True}
    required_capabilities = frozenset({"native_prediction", "x0_prediction"})

    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        c = cfg.method_config
        check_range(cfg.source, "method_config.step_tolerance", c.step_tolerance, 0.0)
        if c.target == "next" and cfg.pipeline_config.sampler_kind != "ode":
            fail(
                cfg.source,
                "method_config.target",
                "'next' trains deterministic steps onto the teacher's trajectory: set pipeline_config.sampler_kind: ode",
            )
        cls.schedule_from(cfg)

    @classmethod
    def schedule_from(cls, cfg: RunConfig) -> StockSchedule:
        return student_schedule(cfg, "kd_denoising_steps", cfg.method_config.step_tolerance)

    @classmethod
    def extra_tensor_columns(cls, cfg: RunConfig) -> dict[str, str]:
        return {name: f"method 'kd' reads {name!r}: {WRITER}" for name in (TRAJ_LATENTS, TRAJ_TIMESTEPS)}

    @classmethod
    def describe(cls, cfg: RunConfig) -> list[str]:
        c, s = cfg.method_config, cls.schedule_from(cfg)
        steps = ", ".join(f"{t:.1f}" for t in s.timesteps)
        return [
            f"kd: student timesteps [{steps}] ({cfg.pipeline_config.sampler_kind} sampler) on the stored teacher "
            f"trajectories; target {c.target}, 0.5 * MSE in {c.loss_space} space"
        ]

    def __init__(self, bundle, adapter, cfg, **kwargs):
        super().__init__(bundle, adapter, cfg, **kwargs)
        self.schedule = self.schedule_from(cfg)
        steps = list(self.schedule.timesteps)
        self.timesteps = torch.tensor(steps, dtype=torch.float32, device=self.device)
        self.next_timesteps = torch.tensor([*steps[1:], 0.0], dtype=torch.float32, device=self.device)
        self._checked = False

    def export_schedule(self) -> StockSchedule:
        return self.schedule

    def check_trajectories(self, batch: dict) -> None:
        """Once (one host read): the stored trajectories fit the latents and reach the student's first step."""
        points, times, x0 = batch[TRAJ_LATENTS], batch[TRAJ_TIMESTEPS], batch["latents"]
        where = batch.get("row_sources", ["the data"])[0]
        if points.dim() != x0.dim() + 1 or points.shape[2:] != x0.shape[1:] or times.shape != points.shape[:2]:
            raise DataError(
                f"{where}: {TRAJ_LATENTS} {list(points.shape[1:])} and {TRAJ_TIMESTEPS} {list(times.shape[1:])} do "
                f"not fit the latent {list(x0.shape[1:])} (expected [S, *latent] and [S])"
            )
        top, first = float(times[:, 0].min()), self.schedule.timesteps[0]  # the run's one extra sync
        if top < first:
            raise DataError(
                f"{where}: the stored trajectory starts at timestep {top:g}, below the student's first step "
                f"{first:g}: generate with --save-steps including step 0 (or --student-steps)"
            )
        self._checked = True

    def train_step(self, batch: dict, iteration: int) -> tuple[dict[str, torch.Tensor], dict]:
        if not self._checked:
            self.check_trajectories(batch)
        student, noise = self.bundle["student"], self.noise
        rng = self.sample_noise(batch)
        cond = self.adapter.conditioning(batch)
        x0 = self.adapter.normalize_latents(batch["latents"])
        points, times = batch[TRAJ_LATENTS].float(), batch[TRAJ_TIMESTEPS].float()
        i = rng.randint(len(self.timesteps))
        t = self.timesteps[i]
        x_t = trajectory_point(noise, points, times, x0, t)
        if self.config.target == "x0":
            target = x0
        else:  # the x0 whose deterministic step from x_t lands on the teacher's sample at t_{i+1}
            t_next = self.next_timesteps[i]
            x_next = trajectory_point(noise, points, times, x0, t_next)
            x_implied, _ = path_x0(x_t, path_coefficients(noise, t, x0), x_next, path_coefficients(noise, t_next, x0))
            target = torch.where(broadcast(t_next == 0, x0), x0, x_implied)
        pred = self.adapter.predict(student, x_t, t, cond)
        loss = kd_loss(pred, x_t, t, target, noise, self.config.loss_space)
        return {"total_loss": loss, "kd_loss": loss.detach()}, {"student_timesteps": t}
