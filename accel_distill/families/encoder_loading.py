"""Lazy loading of a family's frozen preprocessing models: its VAE and a text-only stock pipeline."""

from __future__ import annotations

import torch

from accel_distill.errors import ConfigError


def load_frozen_vae(class_name: str, source: str, *, revision, dtype: torch.dtype, device: torch.device):
    """``diffusers.<class_name>`` from ``source/vae`` on ``device``, eval and frozen; one line if it cannot load."""
    import diffusers

    try:
        vae = getattr(diffusers, class_name).from_pretrained(source, subfolder="vae", revision=revision, dtype=dtype)
    except OSError as e:
        raise ConfigError(f"--model {source}: cannot load the VAE ({str(e).splitlines()[0]})") from None
    return vae.to(device).eval().requires_grad_(False)


def load_text_pipeline(
    class_name: str, source: str, *, revision, dtype: torch.dtype, device: torch.device, without: tuple[str, ...]
):
    """The stock pipeline holding only its tokenizer and text encoder (``without``: the components left out)."""
    import diffusers

    try:
        pipe = getattr(diffusers, class_name).from_pretrained(
            source, **dict.fromkeys(without), revision=revision, dtype=dtype
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {source}: cannot load the text encoder ({str(e).splitlines()[0]})") from None
    pipe.set_progress_bar_config(disable=True)
    pipe.text_encoder.to(device).eval().requires_grad_(False)
    return pipe
