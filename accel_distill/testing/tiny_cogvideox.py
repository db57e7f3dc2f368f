"""Tiny, offline CogVideoX pipelines saved as ordinary diffusers folders.

Loaded through the same ``from_pretrained`` path a Hub id (``THUDM/CogVideoX-2b``) takes.
Sizes follow diffusers' own tiny CogVideoX test configs; the transformer uses rotary position
embeddings (CogVideoX-5b's layout, sized by the video), which need ``attention_head_dim`` a
multiple of 16. The tokenizer and the 2-layer text encoder are the tiny Wan ones (a WordLevel
tokenizer, UMT5: CogVideoXPipeline calls it exactly as the real models' T5).
"""

from __future__ import annotations

from pathlib import Path

import torch

from accel_distill.testing.tiny_wan import WORDS, tiny_text_encoder, word_tokenizer

TEXT_DIM = 32
TEXT_LENGTH = 16  # the transformer's max_text_seq_length (226 for the real models)
VIDEO = {"num_frames": 9, "height": 32, "width": 32}  # -> latents [4, 3, 4, 4]


def tiny_transformer_config(*, rotary: bool = True, text_length: int = TEXT_LENGTH) -> dict:
    """``CogVideoXTransformer3DModel`` keyword arguments (rotary: 5b-style, else 2b-style sin-cos positions)."""
    return dict(
        num_attention_heads=4,
        attention_head_dim=16 if rotary else 8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=TEXT_DIM,
        num_layers=1,
        sample_width=4,
        sample_height=4,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=text_length,
        use_rotary_positional_embeddings=rotary,
    )


def tiny_vae():
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=["CogVideoXDownBlock3D"] * 4,
        up_block_types=["CogVideoXUpBlock3D"] * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )


def scheduler_config(snr_shift_scale: float = 3.0) -> dict:
    """CogVideoX-2b's scheduler config (5b: ``snr_shift_scale`` 1.0)."""
    return dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=snr_shift_scale,
        steps_offset=0,
        timestep_spacing="trailing",
    )


def build_tiny_cogvideox(
    path: str | Path, *, seed: int = 0, rotary: bool = True, text_length: int = TEXT_LENGTH
) -> Path:
    """Write a complete random-weight ``CogVideoXPipeline`` folder at ``path`` and return it
    (``text_length``: the transformer's ``max_text_seq_length``; 226 stands in for the real models' configs)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    pipe = CogVideoXPipeline(
        tokenizer=word_tokenizer(WORDS),
        text_encoder=tiny_text_encoder(64, TEXT_DIM),
        vae=tiny_vae(),
        transformer=CogVideoXTransformer3DModel(**tiny_transformer_config(rotary=rotary, text_length=text_length)),
        scheduler=CogVideoXDDIMScheduler(**scheduler_config()),
    )
    pipe.save_pretrained(path)
    return Path(path)


def perturb_transformer(path: str | Path, *, scale: float = 0.05, seed: int = 1) -> None:
    """Add seeded noise to a saved transformer's weights so teacher and student differ (tests)."""
    from safetensors.torch import load_file, save_file

    file = Path(path) / "transformer" / "diffusion_pytorch_model.safetensors"
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in sorted(load_file(file).items())}
    save_file(state, file, metadata={"format": "pt"})
