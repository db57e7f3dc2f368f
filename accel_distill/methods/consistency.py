"""Consistency distillation (discrete, LCM / FastVideo causal-CD shape; or continuous-time) into a few-step student.

Roles: ``student`` (trainable, initialised from the teacher), ``teacher`` (frozen). The
target network is method-owned: an fp32 EMA of the student's weights (its own
``EMACallback``, checkpointed as ``consistency_target``), stepped after every student update;
until ``target_ema_start`` student steps it equals the online student (decay 0).

Per sample: n ~ U{1..N} on the grid t_0 = 0 < t_1 < ... < t_N = T, uniform in the family's
(shifted) timesteps; x_{t_n} = add_noise(x0_data, eps, t_n). The teacher takes one
classifier-free-guided ODE step t_n -> t_{n-1} with the noise schedule's own Euler step
(``NoiseSchedule.step(kind="ode")``, the step the stock Euler scheduler takes); the student's
``f(x_{t_n}, t_n)`` regresses the target's ``sg f(x_hat_{t_{n-1}}, t_{n-1})``.

Parametrisation (LCM-style, in x0): ``f(x, t) = to_x0(net(x, t), x, t)``; for rectified flow
``x - sigma_t v``, which is ``x`` at sigma = 0, so the boundary condition f(x, 0) = x holds
without c_skip / c_out. At t_{n-1} = 0 the target is x_hat itself (also for schedules whose
x0 at t = 0 is only approximately the input). The exported student samples as a
consistency model: x0 at each of ``student_sampling_steps``, re-noised to the next one
(``pipeline_config.sampler_kind: sde``, FlowMatchLCMScheduler).

Continuous time (``time: continuous``, the sCM-style limit N -> inf): t is drawn from the
family's shifted schedule, and the student's gradient is the tangent df/dt along the teacher's
CFG ODE, ``d/dt f(x_t, t) = J_x f . dx/dt + d_t f``, taken with the student's own (stopped)
weights through the pseudo-loss ``0.5 ||f - sg(f - g)||^2`` (gradient g); g is normalised per
sample as sCM's tangent normalisation, ``g / (rms(g) + c)``. The JVP is ``torch.func.jvp``
(``jvp: forward_ad``; torch's fused SDPA kernels have no forward-mode derivative, so the
student needs ``attention_backend: _native_math``) or central finite differences (``jvp:
finite_difference``, FastGen's MeanFlow approach; any attention backend, sharded or not).
No EMA target: sCM differentiates the online network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from accel_distill.config.schema import EMASpec, RunConfig
from accel_distill.config.validate import check_range, fail
from accel_distill.ema import EMACallback
from accel_distill.methods.base import DistillMethod, describe_schedule, student_schedule
from accel_distill.registry import register_method
from accel_distill.schedule import StockSchedule

TARGET = "consistency_target"  # the target EMA's checkpoint key


@dataclass
class ConsistencyConfig:
    # N: the teacher ODE's discretisation (FastVideo causal CD: 48; LCM: 50 DDIM steps of 1000).
    num_discretization_steps: int = 48
    # Teacher CFG in diffusers' convention v_neg + g (v_cond - v_neg); FastVideo's 3.0 (v_cond + w (...)) is 4.0.
    guidance_scale: float = 4.0
    # The target EMA: decay, and how many student steps it equals the online student first (FastVideo: 0.99 from 200).
    target_ema_decay: float = 0.99
    target_ema_start: int = 200
    # "huber": LCM's pseudo-Huber sqrt((a - b)^2 + c^2) - c; "l2": mean squared error.
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = 0.001
    # The exported few-step schedule (a trailing 0 is dropped), fitted like DMD2's.
    student_sampling_steps: list[float] = field(default_factory=lambda: [1000.0, 757.0, 522.0])
    step_tolerance: float = 1.0
    # "discrete": the N-step grid and the EMA target; "continuous": the tangent df/dt (no target).
    time: Literal["discrete", "continuous"] = "discrete"
    # continuous: how df/dt is computed, the finite-difference step (in sigma units: 5e-3 as FastGen's
    # Wan MeanFlow), and sCM's tangent normalisation constant c.
    jvp: Literal["finite_difference", "forward_ad"] = "finite_difference"
    fd_epsilon: float = 0.005
    tangent_norm_c: float = 0.1


def timestep_grid(noise, n: int, device: torch.device) -> torch.Tensor:
    """t_0 = 0 < ... < t_N = T: ``N + 1`` timesteps uniform in the schedule's (shifted) time."""
    u = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float32)
    return noise.timesteps_from_uniform(u).to(device)


def continuous_consistency_loss(pred: torch.Tensor, tangent: torch.Tensor, c: float = 0.1) -> torch.Tensor:
    """``0.5 * mean((f - sg(f - g))^2)`` with ``g = tangent / (rms(tangent) + c)`` per sample: the gradient
    w.r.t. the student's x0 is ``g / numel`` (descent moves f(x_t, t) against its change along the ODE)."""
    dims = tuple(range(1, tangent.dim()))
    g = tangent.detach().float()
    g = g / (g.pow(2).mean(dim=dims, keepdim=True).sqrt() + c)
    pred = pred.float()
    return 0.5 * F.mse_loss(pred, (pred - g).detach())


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, c: float = 0.001) -> torch.Tensor:
    """Distance of the student's x0 to the (detached) target's: pseudo-Huber or mean squared error."""
    target = target.detach().float()
    if kind == "l2":
        return F.mse_loss(pred.float(), target)
    return (((pred.float() - target) ** 2 + c * c).sqrt() - c).mean()


@register_method("consistency")
class ConsistencyMethod(DistillMethod):
    """Discrete consistency distillation with a method-owned EMA target and a CFG teacher ODE step."""

    config_class = ConsistencyConfig
    required_roles = ("student", "teacher")
    role_trainable = {"student": True, "teacher": False}
    required_capabilities = frozenset({"native_prediction", "x0_prediction", "cfg"})

    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        c, src = cfg.method_config, cfg.source
        check_range(src, "method_config.num_discretization_steps", c.num_discretization_steps, 1)
        check_range(src, "method_config.guidance_scale", c.guidance_scale, 0.0)
        check_range(src, "method_config.target_ema_decay", c.target_ema_decay, 0.0, 1.0)
        check_range(src, "method_config.target_ema_start", c.target_ema_start, 0)
        check_range(src, "method_config.huber_c", c.huber_c, 1e-12)
        check_range(src, "method_config.step_tolerance", c.step_tolerance, 0.0)
        check_range(src, "method_config.fd_epsilon", c.fd_epsilon, 1e-9, 0.5)
        check_range(src, "method_config.tangent_norm_c", c.tangent_norm_c, 0.0)
        backend = cfg.roles["student"].attention_backend or cfg.training.attention_backend
        if c.time == "continuous" and c.jvp == "forward_ad" and backend != "_native_math":
            fail(
                src,
                "method_config.jvp",
                "forward_ad needs roles.student.attention_backend: _native_math (torch's fused SDPA kernels "
                "have no forward-mode derivative: 'Trying to use forward AD with _scaled_dot_product_flash_"
                "attention_for_cpu that does not support it'); or use jvp: finite_difference",
            )
        cls.schedule_from(cfg)

    @classmethod
    def schedule_from(cls, cfg: RunConfig) -> StockSchedule:
        return student_schedule(cfg, "student_sampling_steps", cfg.method_config.step_tolerance)

    @classmethod
    def needs_negative_conditioning(cls, cfg: RunConfig) -> bool:
        return cfg.method_config.guidance_scale != 1.0

    @classmethod
    def describe(cls, cfg: RunConfig) -> list[str]:
        c = cfg.method_config
        how = (
            f"N = {c.num_discretization_steps} teacher ODE steps, {c.loss} loss, target EMA {c.target_ema_decay} "
            f"after {c.target_ema_start} student steps"
            if c.time == "discrete"
            else f"continuous time, tangent by {c.jvp}, normalised with c = {c.tangent_norm_c}"
        )
        return [
            f"consistency: {how}, teacher CFG {c.guidance_scale}",
            f"consistency: exported {describe_schedule(cls.schedule_from(cfg))}",
        ]

    def __init__(self, bundle, adapter, cfg, **kwargs):
        super().__init__(bundle, adapter, cfg, **kwargs)
        self.schedule = self.schedule_from(cfg)
        self.grid = timestep_grid(self.noise, self.config.num_discretization_steps, self.device)
        self.target: EMACallback | None = None

    def build_callbacks(self) -> list:
        c = self.config
        if c.time == "continuous":
            return []
        # min_decay = decay: a constant decay once started (diffusers' EMAModel would ramp (1 + k) / (10 + k))
        d = c.target_ema_decay
        spec = EMASpec(decay=d, min_decay=d, update_after_step=c.target_ema_start, export=False, validate=False)
        self.target = EMACallback(self.bundle, {"student": spec}, name=TARGET)
        return [self.target]

    def export_schedule(self) -> StockSchedule:
        return self.schedule

    # --- pieces -----------------------------------------------------------------------
    def teacher_step(self, x_t, t, t_prev, cond) -> torch.Tensor:
        """x_hat_{t_prev}: one CFG Euler step of the teacher's probability-flow ODE (no gradient)."""
        g = self.config.guidance_scale
        neg = self.negative(cond) if g != 1.0 else None
        v = self.adapter.predict_cfg(self.bundle["teacher"], x_t, t, cond, neg, g)
        return self.noise.step(x_t, v, t, t_prev, None, "ode")

    def target_x0(self, x_prev, t_prev, cond) -> torch.Tensor:
        """sg f_target(x_hat, t_prev), with f(x, 0) = x at the boundary."""
        if self.target is None:
            raise RuntimeError("the consistency target EMA is built by build_callbacks() before training")
        with self.target.averaged("student"):
            x0 = self.adapter.predict_x0(self.bundle["student"], x_prev, t_prev, cond)
        boundary = (t_prev == 0).view(-1, *([1] * (x0.dim() - 1)))
        return torch.where(boundary, x_prev.float(), x0)

    def tangent(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """df/dt of the student's x0 along the teacher's CFG ODE at (x_t, t), per timestep unit (no gradient)."""
        g = self.config.guidance_scale
        neg = self.negative(cond) if g != 1.0 else None
        v = self.adapter.predict_cfg(self.bundle["teacher"], x_t, t, cond, neg, g)
        dx_dt = self.noise.step(x_t, v, t, t + 1, None, "ode") - x_t  # the ODE over one timestep unit
        student = self.bundle["student"]

        def f(x, tt):
            return self.adapter.predict_x0(student, x, tt, cond)

        if self.config.jvp == "forward_ad":
            return torch.func.jvp(f, (x_t, t), (dx_dt, torch.ones_like(t)))[1]
        e = self.config.fd_epsilon * self.noise.num_train_timesteps
        return (f(x_t + e * dx_dt, t + e) - f(x_t - e * dx_dt, t - e)) / (2 * e)

    def continuous_step(self, x0, cond, rng) -> tuple[dict[str, torch.Tensor], dict]:
        t = self.noise.timesteps_from_uniform(rng.rand())
        x_t = self.noise.add_noise(x0, rng.randn_like(x0), t)
        with torch.no_grad():
            tangent = self.tangent(x_t, t, cond)
        pred = self.adapter.predict_x0(self.bundle["student"], x_t, t, cond)
        loss = continuous_consistency_loss(pred, tangent, self.config.tangent_norm_c)
        return {"total_loss": loss, "consistency_loss": loss.detach()}, {"timesteps": t, "student_x0": pred.detach()}

    # --- the step ---------------------------------------------------------------------
    def train_step(self, batch: dict, iteration: int) -> tuple[dict[str, torch.Tensor], dict]:
        x0 = self.adapter.normalize_latents(batch["latents"])
        cond, rng = self.adapter.conditioning(batch), self.sample_noise(batch)
        if self.config.time == "continuous":
            return self.continuous_step(x0, cond, rng)
        n = rng.randint(self.config.num_discretization_steps) + 1  # [B] in 1..N
        t, t_prev = self.grid[n], self.grid[n - 1]
        x_t = self.noise.add_noise(x0, rng.randn_like(x0), t)
        with torch.no_grad():  # the target first: its weight swap must precede the student's graph
            target = self.target_x0(self.teacher_step(x_t, t, t_prev, cond), t_prev, cond)
        pred = self.adapter.predict_x0(self.bundle["student"], x_t, t, cond)
        loss = consistency_loss(pred, target, self.config.loss, self.config.huber_c)
        return {"total_loss": loss, "consistency_loss": loss.detach()}, {"timesteps": t, "student_x0": pred.detach()}
