"""Noise schedules: how clean latents, noise and a network's prediction relate at a timestep.

Two schedules: :class:`RectifiedFlow` (Wan) and :class:`DDPMVPrediction` (CogVideoX).
Methods speak clean latents (x0) and noise; a schedule translates to what the
network predicts (its *native* prediction: the flow for rectified-flow models,
v or eps for DDPM models), moves a sample from one timestep to the next the way
the exported stock scheduler will, and fits that scheduler's config so the
stock pipeline visits exactly the trained timesteps. It knows no network.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from accel_distill.errors import ConfigError
from accel_distill.schedule import (
    DDIM_SCHEDULER,
    DDIMSchedule,
    FewStepSchedule,
    StockSchedule,
    fit_ddim_schedule,
    fit_few_step_schedule,
)


class NoiseSchedule(ABC):
    """The forward process and its conversions; timesteps ``t`` are float ``[B]`` in [0, T]."""

    num_train_timesteps: int = 1000
    prediction: str = ""  # the network's native output ("flow", "v", "eps")

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t from clean latents and unit Gaussian noise."""

    @abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The native prediction a perfect network makes at x_t = add_noise(x0, noise, t)."""

    @abstractmethod
    def to_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean latents implied by a native prediction at x_t."""

    @abstractmethod
    def to_noise(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise implied by a native prediction at x_t."""

    @abstractmethod
    def from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The native prediction that implies ``x0`` at x_t."""

    @abstractmethod
    def timesteps_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Training timesteps for u in [0, 1] (with the family's shift, as at inference)."""

    @abstractmethod
    def step(
        self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, noise, kind: str
    ) -> torch.Tensor:
        """Move from t to t_next as the exported few-step sampler does ("sde": re-noise x0 with
        ``noise()``'s draw; "ode": a deterministic step)."""

    @abstractmethod
    def fit_few_step(self, steps: Sequence[float], *, key: str, tolerance: float, kind: str) -> StockSchedule:
        """A stock scheduler config whose ``set_timesteps(len(steps))`` gives ``steps`` (ConfigError naming ``key``).

        A classmethod where the fit needs nothing of the model (rectified flow); a method of the
        model's schedule where it does (DDPM: the exported scheduler keeps the model's betas).
        """

    @abstractmethod
    def many_step_schedule(self) -> StockSchedule:
        """The stock scheduler a many-step (finetuned) model samples with, for ``set_timesteps(n)``."""

    @abstractmethod
    def sample(
        self,
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        schedule: StockSchedule,
        latents: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        on_step=None,
    ) -> torch.Tensor:
        """Denoise pure noise in ``schedule``'s steps exactly as the stock pipeline + scheduler do;
        ``on_step(i, t, x)`` sees the sample each step starts from (:data:`accel_distill.sampling.StepHook`)."""


class RectifiedFlow(NoiseSchedule):
    """x_t = (1 - s) x0 + s noise with s = t / T; the network predicts the flow v = noise - x0."""

    prediction = "flow"

    def __init__(self, shift: float = 1.0):
        self.shift = float(shift)

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Noise level s = t / T of per-sample timesteps ``t`` [B], shaped to broadcast over ``like``."""
        s = t.to(torch.float32) / self.num_train_timesteps
        return s.view(-1, *([1] * (like.dim() - 1)))

    def shift_sigma(self, s: torch.Tensor) -> torch.Tensor:
        """The timestep shift diffusers' flow-matching schedulers apply."""
        k = self.shift
        return k * s / (1 + (k - 1) * s)

    def timesteps_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        return self.shift_sigma(u) * self.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.sigma(t, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return noise - x0

    def to_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t - self.sigma(t, x_t) * pred

    def to_noise(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t + (1 - self.sigma(t, x_t)) * pred

    def from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x_t - x0) / self.sigma(t, x_t).clamp_min(1e-8)

    def step(self, x_t, pred, t, t_next, noise, kind: str) -> torch.Tensor:
        if kind == "ode":  # Euler, FlowMatchEulerDiscreteScheduler
            return x_t + (self.sigma(t_next, x_t) - self.sigma(t, x_t)) * pred
        x0 = self.to_x0(pred, x_t, t)  # FlowMatchLCMScheduler: x0, then re-noise to t_next
        return self.add_noise(x0, noise(x0), t_next)

    @classmethod
    def fit_few_step(cls, steps, *, key: str, tolerance: float, kind: str) -> FewStepSchedule:
        return fit_few_step_schedule(steps, key=key, tolerance=tolerance, kind=kind)

    def sample(self, predict, schedule: FewStepSchedule, latents, *, generator=None, on_step=None) -> torch.Tensor:
        from accel_distill.sampling import few_step_sample

        return few_step_sample(predict, schedule, latents, generator=generator, on_step=on_step)

    def many_step_schedule(self) -> FewStepSchedule:
        """The base schedule a many-step (finetuned) model samples with: Euler at this shift."""
        return FewStepSchedule((), shift=self.shift, shift_terminal=None, kind="ode")


class DDPMVPrediction(NoiseSchedule):
    """DDPM with v-prediction (CogVideoX): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, v = sqrt(a_t) noise - sqrt(1 - a_t) x0.

    ``a_t`` is ``alphas_cumprod[t]`` of the model's own scheduler config, computed by the stock
    scheduler itself (CogVideoX: scaled-linear betas, SNR shift, zero terminal SNR, so x_999 is pure
    noise). Timesteps are the integers 0 .. T-1; a fractional ``t`` uses ``floor(t)``'s alpha.
    Few-step students sample with deterministic DDIM steps (:class:`~accel_distill.schedule.DDIMSchedule`).
    """

    prediction = "v"

    def __init__(self, scheduler_config: dict):
        import diffusers

        sched = getattr(diffusers, DDIM_SCHEDULER).from_config(scheduler_config)
        self.config = {k: v for k, v in sched.config.items() if not k.startswith("_")}
        if self.config.get("prediction_type") != "v_prediction":
            raise ValueError(
                f"DDPMVPrediction needs prediction_type v_prediction, got {self.config.get('prediction_type')!r}"
            )
        self.num_train_timesteps = int(self.config["num_train_timesteps"])
        alphas = sched.alphas_cumprod.to(torch.float64)
        # sqrt(a), sqrt(1 - a) in float64, then float32 for the training math
        self._table = torch.stack([alphas**0.5, (1 - alphas) ** 0.5], dim=1).float()
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(a_t), sqrt(1 - a_t)) of per-sample timesteps ``t`` [B], shaped to broadcast over ``like``."""
        device = like.device
        if device not in self._on_device:  # copied once: a host-to-device copy per step would sync
            self._on_device[device] = self._table.to(device)
        index = t.to(device).floor().long().clamp(0, self.num_train_timesteps - 1)
        c = self._on_device[device][index].view(-1, 2, *([1] * (like.dim() - 1)))
        return c[:, 0], c[:, 1]

    def timesteps_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        return (u * self.num_train_timesteps).floor().clamp(0, self.num_train_timesteps - 1)

    def add_noise(self, x0, noise, t):
        a, s = self.coefficients(t, x0)
        return a * x0 + s * noise

    def target(self, x0, noise, t):
        a, s = self.coefficients(t, x0)
        return a * noise - s * x0

    def to_x0(self, pred, x_t, t):
        a, s = self.coefficients(t, x_t)
        return a * x_t - s * pred

    def to_noise(self, pred, x_t, t):
        a, s = self.coefficients(t, x_t)
        return s * x_t + a * pred

    def from_x0(self, x0, x_t, t):
        a, s = self.coefficients(t, x_t)
        return (a * x_t - x0) / s.clamp_min(1e-8)

    def step(self, x_t, pred, t, t_next, noise, kind: str) -> torch.Tensor:
        """A deterministic DDIM step to ``t_next`` (CogVideoXDDIMScheduler's, in float32)."""
        if kind != "ode":
            raise ValueError(f"DDPMVPrediction steps deterministically (DDIM, kind 'ode'), not {kind!r}")
        a, s = self.coefficients(t, x_t)
        a_next, s_next = self.coefficients(t_next, x_t)
        x0 = a * x_t - s * pred
        ratio = s_next / s
        return ratio * x_t + (a_next - a * ratio) * x0

    def fit_few_step(self, steps, *, key: str, tolerance: float, kind: str) -> StockSchedule:
        if kind != "ode":
            raise ConfigError(f"{key}: sampler kind {kind!r}: this model's few-step sampler is DDIM ('ode')")
        return fit_ddim_schedule(steps, self.config, key=key, tolerance=tolerance)

    def many_step_schedule(self) -> StockSchedule:
        return DDIMSchedule((), config=dict(self.config))

    def sample(self, predict, schedule: StockSchedule, latents, *, generator=None, on_step=None) -> torch.Tensor:
        from accel_distill.sampling import ddim_sample

        return ddim_sample(predict, schedule, latents, on_step=on_step)
