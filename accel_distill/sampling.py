"""The project's few-step (DMD multi-step) sampler.

"sde" schedules: at each step ``t_i``, ``x0 = x - sigma_i * v``, then re-noise to
``sigma_{i+1}`` with fresh noise; the last ``sigma`` is 0, so the last step
returns ``x0``. "ode" schedules take Euler steps ``x + (sigma_{i+1} - sigma_i) v``.
The arithmetic, dtypes and random draws copy ``FlowMatchLCMScheduler.step`` /
``FlowMatchEulerDiscreteScheduler.step`` as the stock pipelines call them, so with
the same seeds this sampler and the stock pipeline loading an exported student
give identical latents.

DDPM models (CogVideoX) sample with :func:`ddim_sample`, a copy of
``CogVideoXDDIMScheduler.step`` as ``CogVideoXPipeline`` calls it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from .schedule import FewStepSchedule, StockSchedule

# on_step(i, t, x): the sample x that step i starts from, at its timestep t (a 0-d float tensor).
StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]


def few_step_sample(
    predict_flow: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: FewStepSchedule,
    latents: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    on_step: StepHook | None = None,
) -> torch.Tensor:
    """Denoise ``latents`` (pure noise at t=1000) in ``schedule.num_inference_steps`` steps.

    ``predict_flow(x, t)`` returns the flow (velocity) prediction for ``x`` at float
    timesteps ``t`` of shape ``[B]``; like the stock pipelines it should cast ``x`` to the
    model's dtype itself. Re-noise noise comes from ``generator``, or, when it is None,
    from the global torch RNG exactly as the stock pipeline draws it. The result has the
    model output's dtype. ``on_step(i, t, x)`` sees the sample ``x`` each step ``i`` starts from, at its
    timestep ``t`` (e.g. to record a trajectory).
    """
    scheduler = stock_scheduler(schedule, latents.device)
    timesteps, sigmas = scheduler.timesteps, scheduler.sigmas  # float32, as the pipeline sees them

    x = latents
    for i, t in enumerate(timesteps):
        if on_step is not None:
            on_step(i, t, x)
        v = predict_flow(x, t.expand(x.shape[0]))
        # Same op order and dtypes as FlowMatchLCMScheduler.step (float32 math, cast back).
        sample = x.to(torch.float32)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if schedule.kind == "ode":
            x = (sample + (sigma_next - sigma) * v).to(v.dtype)
            continue
        x0 = sample - sigma * v
        # Drawn even at the last step (sigma_next = 0) to keep the RNG stream identical.
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x = ((1 - sigma_next) * x0 + sigma_next * noise).to(v.dtype)
    return x


def stock_scheduler(schedule: StockSchedule, device: torch.device):
    """``schedule``'s stock scheduler after ``set_timesteps``, checked to visit ``schedule.timesteps``."""
    scheduler = schedule.make_scheduler()
    scheduler.set_timesteps(schedule.num_inference_steps, device=device)
    if tuple(float(t) for t in scheduler.timesteps.tolist()) != tuple(schedule.timesteps):
        raise ValueError(
            f"schedule.timesteps {list(schedule.timesteps)} differ from what its scheduler config "
            f"produces {scheduler.timesteps.tolist()}; build schedules with fit_few_step_schedule (rectified flow) "
            "or the noise schedule's fit_few_step"
        )
    return scheduler


def ddim_sample(
    predict_v: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: StockSchedule,
    latents: torch.Tensor,
    *,
    on_step: StepHook | None = None,
) -> torch.Tensor:
    """Denoise ``latents`` (pure noise) with ``schedule``'s ``CogVideoXDDIMScheduler`` as ``CogVideoXPipeline`` does.

    ``predict_v(x, t)`` returns the v prediction at the scheduler's integer timesteps ``t`` [B].
    The arithmetic copies ``CogVideoXDDIMScheduler.step`` (its float64 ``alphas_cumprod``, the step
    from ``t`` to ``t - T // n``, the clean end's ``final_alpha_cumprod``) and the pipeline's casts
    (the prediction to float32, the sample back to the latents' dtype after each step), so the
    stock pipeline loading the export gives identical latents. Deterministic: no noise is drawn.
    ``on_step`` as in :func:`few_step_sample`.
    """
    scheduler = stock_scheduler(schedule, latents.device)
    alphas, stride = scheduler.alphas_cumprod, scheduler.config.num_train_timesteps // schedule.num_inference_steps
    x = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        if on_step is not None:
            on_step(i, t, x)
        v = predict_v(x, t.expand(x.shape[0])).float()
        prev = t - stride
        alpha_prod_t = alphas[t]
        alpha_prod_t_prev = alphas[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        x0 = (alpha_prod_t**0.5) * x - (beta_prod_t**0.5) * v
        a_t = ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) ** 0.5
        b_t = alpha_prod_t_prev**0.5 - alpha_prod_t**0.5 * a_t
        x = (a_t * x + b_t * x0).to(latents.dtype)
    return x
