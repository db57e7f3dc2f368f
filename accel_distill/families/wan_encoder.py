"""Wan's VAE + UMT5 text encoder for preprocessing."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from accel_distill.errors import ConfigError
from accel_distill.families.encoder_loading import LazyEncoders, component_config


class WanEncoder(LazyEncoders):
    """Wan (2.1 / 2.2 single-transformer) VAE + UMT5 text encoder from a diffusers folder or Hub id."""

    vae_class = "AutoencoderKLWan"
    pipeline_class = "WanPipeline"
    pipeline_without = ("transformer", "transformer_2", "vae")

    def configure(self, vae: dict) -> None:
        self.latent_channels = int(vae["z_dim"])
        self.temporal_factor = int(vae.get("scale_factor_temporal", 4))
        self.spatial_factor = int(vae.get("scale_factor_spatial", 8))
        try:  # the transformer's patch size also divides the latent; a VAE + text encoder folder is enough
            patch = component_config(self.source, "transformer").get("patch_size") or (1, 2, 2)
        except ConfigError:
            patch = (1, 2, 2)
        self.spatial_multiple = self.spatial_factor * int(patch[-1])

    # -- encoding -------------------------------------------------------------------------
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
