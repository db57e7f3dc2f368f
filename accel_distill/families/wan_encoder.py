"""Wan's VAE + UMT5 text encoder for preprocessing, and reading a component's config without weights."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

import torch

from accel_distill.errors import ConfigError
from accel_distill.families.encoder_loading import load_frozen_vae, load_text_pipeline


@lru_cache(maxsize=16)
def component_config(source: str, subfolder: str) -> dict:
    """A component's config (vae, scheduler, transformer) from a folder or the Hub, without weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    # load_config only needs the class's config file name: scheduler_config.json or config.json.
    reader = FlowMatchEulerDiscreteScheduler if subfolder == "scheduler" else WanTransformer3DModel
    try:
        return dict(reader.load_config(source, subfolder=subfolder))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{source}: cannot read {subfolder}/config ({str(e).splitlines()[0]})") from None


class WanEncoder:
    """Wan (2.1 / 2.2 single-transformer) VAE + UMT5 text encoder from a diffusers folder or Hub id."""

    def __init__(self, source: str, *, dtype: torch.dtype, device: torch.device, revision: str | None = None):
        self.source = os.path.expanduser(source)
        self.dtype = dtype
        self.device = torch.device(device)
        self.revision = revision
        vae = component_config(self.source, "vae")
        self.latent_channels = int(vae["z_dim"])
        self.temporal_factor = int(vae.get("scale_factor_temporal", 4))
        self.spatial_factor = int(vae.get("scale_factor_spatial", 8))
        try:  # the transformer's patch size also divides the latent; a VAE + text encoder folder is enough
            patch = component_config(self.source, "transformer").get("patch_size") or (1, 2, 2)
        except ConfigError:
            patch = (1, 2, 2)
        self.spatial_multiple = self.spatial_factor * int(patch[-1])
        self._vae = None
        self._pipe = None

    # -- checks -------------------------------------------------------------------------
    def check_video_size(self, height: int, width: int, num_frames: int) -> None:
        """ConfigError unless the size is one Wan can use: H, W multiples of 16, frames 4k+1."""
        m, t = self.spatial_multiple, self.temporal_factor
        for name, value in (("--height", height), ("--width", width)):
            if value < m or value % m:
                raise ConfigError(f"{name} {value}: must be a positive multiple of {m} for this model")
        if num_frames < 1 or (num_frames - 1) % t:
            lo = (max(num_frames, 1) - 1) // t * t + 1
            raise ConfigError(f"--num-frames {num_frames}: must be {t}k+1 for this model's VAE (e.g. {lo} or {lo + t})")

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        t, s = self.temporal_factor, self.spatial_factor
        return (self.latent_channels, (num_frames - 1) // t + 1, height // s, width // s)

    # -- models ---------------------------------------------------------------------------
    @property
    def vae(self):
        if self._vae is None:
            kw = dict(revision=self.revision, dtype=self.dtype, device=self.device)
            self._vae = load_frozen_vae("AutoencoderKLWan", self.source, **kw)
        return self._vae

    @property
    def pipe(self):
        """A WanPipeline holding only the tokenizer and the text encoder."""
        if self._pipe is None:
            kw = dict(revision=self.revision, dtype=self.dtype, device=self.device)
            self._pipe = load_text_pipeline(
                "WanPipeline", self.source, without=("transformer", "transformer_2", "vae"), **kw
            )
        return self._pipe

    # -- encoding -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, F, H, W]`` in [-1, 1] -> un-normalised latents ``[B, C, T, h, w]`` (posterior mode), on CPU."""
        x = pixels.to(self.device, self.dtype)
        return self.vae.encode(x).latent_dist.mode().cpu()

    def encode_conditioning(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-clip conditioning tensors besides the latent, from uint8 frames ``[B, F, H, W, 3]``: none for
        text-to-video (image-to-video families store the first frame's latent, image embeddings)."""
        return {}

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str], max_length: int) -> list[torch.Tensor]:
        """One ``[L_i, D]`` embedding per prompt: the real tokens (at least one row), on CPU."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        pipe = self.pipe
        prompts = list(prompts)
        embeds, _ = pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
            device=self.device,
            dtype=self.dtype,
        )
        # the same tokenisation encode_prompt does, for the number of real tokens
        mask = pipe.tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        ).attention_mask
        lengths = mask.gt(0).sum(dim=1).clamp(min=1).tolist()  # an empty prompt keeps one (zero) row
        embeds = embeds.cpu()
        return [embeds[i, :n].clone() for i, n in enumerate(lengths)]
