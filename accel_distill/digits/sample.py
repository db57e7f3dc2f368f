"""Sampling the digits pipelines with stock ``WanPipeline`` (demo grid, quality benchmark)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from accel_distill.digits import TEXT_MAX_LENGTH, caption
from accel_distill.digits.data import to_uint8_gray


def load_pipeline(folder: str | Path):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def distillation_guidance(export: str | Path) -> float | None:
    """The teacher CFG scale a student export was distilled against (DMD2's real_score_guidance_scale), if any.

    Teacher samples compared with the student use it: like against like.
    """
    from accel_distill.errors import UserError
    from accel_distill.hub import read_export_info

    try:
        g = read_export_info(export).get("method_config", {}).get("real_score_guidance_scale")
    except UserError:
        return None
    return None if g is None else float(g)


DEFAULT_TEACHER_GUIDANCE = 3.0  # for a student export that records no distillation guidance


def teacher_guidance(student: str | Path | None) -> float:
    """The CFG scale to sample the teacher at when comparing with ``student``: the one it learned."""
    return (distillation_guidance(student) if student else None) or DEFAULT_TEACHER_GUIDANCE


def clip_shape(model: str | Path) -> dict[str, int]:
    """``height`` / ``width`` / ``num_frames`` a digits video model was built for (its ``digits_build.json``)."""
    import json

    info = json.loads((Path(model) / "digits_build.json").read_text())
    return {k: int(info[k]) for k in ("height", "width", "num_frames")}


def image_size(pipe) -> int:
    """Pixels per side: 2x2 latents times the VAE's spatial factor."""
    return 2 * int(pipe.vae_scale_factor_spatial)


@torch.no_grad()
def generate(pipe, labels, seeds, *, steps: int, guidance_scale: float = 1.0, batch_size: int = 100) -> np.ndarray:
    """[N, H, W] uint8 digits for prompts "a handwritten digit {label}", one fixed seed per sample."""
    size = image_size(pipe)
    frames = sample_frames(
        pipe,
        [caption(y) for y in labels],
        seeds,
        steps=steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        height=size,
        width=size,
        num_frames=1,
    )
    return to_uint8_gray(frames)


@torch.no_grad()
def sample_frames(
    pipe,
    prompts: list[str],
    seeds,
    *,
    steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    num_frames: int,
    batch_size: int = 100,
) -> np.ndarray:
    """Stock ``WanPipeline`` samples [N, F, H, W, 3] in [0, 1], one fixed seed per prompt; negative prompt ""."""
    prompts, seeds = list(prompts), list(seeds)
    original = pipe.scheduler
    if steps == 1 and getattr(original.config, "shift_terminal", None) is not None:
        # stock FlowMatch*Scheduler stretches the single sigma to 0/0 (NaN) when shift_terminal is set;
        # one step only ever runs at t = 1000, which the same scheduler without the stretch gives.
        pipe.scheduler = type(original).from_config(original.config, shift_terminal=None)
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch, sd = prompts[i : i + batch_size], seeds[i : i + batch_size]
            frames = pipe(
                prompt=batch,
                negative_prompt=[""] * len(batch) if guidance_scale > 1 else None,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                num_frames=num_frames,
                max_sequence_length=TEXT_MAX_LENGTH,
                output_type="np",
                generator=[torch.Generator().manual_seed(int(s)) for s in sd],
            ).frames
            out.append(np.asarray(frames))
    finally:
        pipe.scheduler = original
    return np.concatenate(out)
