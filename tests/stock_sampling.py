"""Stock diffusers sampling of an exported few-step Wan student, against the project's sampler."""

from __future__ import annotations

from pathlib import Path

import torch

from accel_distill.sampling import few_step_sample


def assert_stock_wan_samples(export: Path, schedule, *, text_dim: int = 32) -> None:
    """A plain ``WanPipeline`` call on ``export`` visits exactly ``schedule``'s timesteps, and its latents equal
    :func:`few_step_sample`'s with the same seeds (the tiny 5x32x32 video of the test models)."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(export)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(float(kw["timestep"][0])), with_kwargs=True)
    embeds = torch.randn(1, 16, text_dim, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    stock = pipe(
        prompt_embeds=embeds,
        num_inference_steps=schedule.num_inference_steps,
        guidance_scale=1.0,
        height=32,
        width=32,
        num_frames=5,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert type(pipe.scheduler).__name__ == schedule.scheduler_class
    assert seen == list(schedule.timesteps)  # exactly the timesteps the student trained at
    model, noise = pipe.transformer, torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    with torch.no_grad():
        ours = few_step_sample(
            lambda x, t: model(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0],
            schedule,
            noise,
        )
    assert torch.equal(ours, stock)
