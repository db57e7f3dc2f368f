"""Tiny, offline LTX-Video pipelines saved as ordinary diffusers folders.

Loaded through the same ``from_pretrained`` path a Hub id (``Lightricks/LTX-Video``) takes. The
transformer is FACTS.md's tiny ``LTXVideoTransformer3DModel`` (patch 1, packed tokens); the VAE a tiny
``AutoencoderKLLTXVideo`` (latent 8, 4x spatial and 4x temporal compression) whose ``latents_mean`` /
``latents_std`` buffers are set to non-trivial values so that normalisation is exercised. The tokenizer and
the 2-layer text encoder are the tiny Wan ones (LTXPipeline calls them exactly as the real model's T5).
"""

from __future__ import annotations

from pathlib import Path

import torch

from accel_distill.testing.tiny_cogvideox import perturb_transformer  # noqa: F401  (re-exported for tests)
from accel_distill.testing.tiny_wan import WORDS, tiny_text_encoder, word_tokenizer

TEXT_DIM = 32
LATENT_CHANNELS = 8
VIDEO = {"num_frames": 9, "height": 32, "width": 32}  # -> latents [8, 3, 8, 8] (LTXPipeline: H, W multiples of 32)


def tiny_transformer_config() -> dict:
    return dict(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=TEXT_DIM,
    )


def tiny_vae(seed: int = 0, *, timestep_conditioning: bool = False):
    """``timestep_conditioning``: LTX-Video 0.9.1+'s decoder, which takes a decode timestep."""
    from diffusers import AutoencoderKLLTXVideo

    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=timestep_conditioning,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    gen = torch.Generator().manual_seed(seed)
    vae.latents_mean.copy_(0.1 * torch.randn(LATENT_CHANNELS, generator=gen))
    vae.latents_std.copy_(0.5 + torch.rand(LATENT_CHANNELS, generator=gen))
    return vae


def scheduler_config() -> dict:
    """Lightricks/LTX-Video's scheduler config (dynamic shifting by video size, terminal 0.1)."""
    return dict(
        base_image_seq_len=1024,
        base_shift=0.95,
        max_image_seq_len=4096,
        max_shift=2.05,
        num_train_timesteps=1000,
        shift=1.0,
        shift_terminal=0.1,
        use_dynamic_shifting=True,
    )


def build_tiny_ltx(path: str | Path, *, seed: int = 0) -> Path:
    """Write a complete random-weight ``LTXPipeline`` folder at ``path`` and return it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    pipe = LTXPipeline(
        tokenizer=word_tokenizer(WORDS),
        text_encoder=tiny_text_encoder(64, TEXT_DIM),
        vae=tiny_vae(seed),
        transformer=LTXVideoTransformer3DModel(**tiny_transformer_config()),
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config()),
    )
    pipe.save_pretrained(path)
    return Path(path)
