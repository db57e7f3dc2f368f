"""The project's few-step (DMD multi-step) sampler.

"sde" schedules: at each step ``t_i``, ``x0 = x - sigma_i * v``, then re-noise to
``sigma_{i+1}`` with fresh noise; the last ``sigma`` is 0, so the last step
returns ``x0``. "ode" schedules take Euler steps ``x + (sigma_{i+1} - sigma_i) v``.
The arithmetic, dtypes and random draws copy ``FlowMatchLCMScheduler.step`` /
``FlowMatchEulerDiscreteScheduler.step`` as the stock pipelines call them, so with
the same seeds this sampler and the stock pipeline loading an exported student
give identical latents.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from .schedule import FewStepSchedule


def few_step_sample(
    predict_flow: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: FewStepSchedule,
    latents: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoise ``latents`` (pure noise at t=1000) in ``schedule.num_inference_steps`` steps.

    ``predict_flow(x, t)`` returns the flow (velocity) prediction for ``x`` at float
    timesteps ``t`` of shape ``[B]``; like the stock pipelines it should cast ``x`` to the
    model's dtype itself. Re-noise noise comes from ``generator``, or, when it is None,
    from the global torch RNG exactly as the stock pipeline draws it. The result has the
    model output's dtype.
    """
    scheduler = schedule.make_scheduler()
    scheduler.set_timesteps(schedule.num_inference_steps, device=latents.device)
    timesteps, sigmas = scheduler.timesteps, scheduler.sigmas  # float32, as the pipeline sees them
    if tuple(timesteps.tolist()) != tuple(schedule.timesteps):
        raise ValueError(
            f"schedule.timesteps {list(schedule.timesteps)} differ from what its scheduler config "
            f"produces {timesteps.tolist()}; build schedules with fit_few_step_schedule"
        )

    x = latents
    for i, t in enumerate(timesteps):
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
