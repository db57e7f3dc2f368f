"""A family's frozen preprocessing models: its VAE and a text-only stock pipeline, loaded lazily, and
component configs read without weights.

:class:`LazyEncoders` is what every family's preprocessing encoder shares: where the weights
come from, the size rules of a 4k+1-frame video VAE, VAE encoding and the lazy loads; a family
names its stock classes and reads its VAE config's compression (``configure``).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import ClassVar

import torch

from accel_distill.errors import ConfigError


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


class LazyEncoders(ABC):
    """VAE + text encoder of a diffusers folder or Hub id for preprocessing; weights load on first use.

    A subclass sets ``vae_class`` / ``pipeline_class`` (diffusers names), the components the text-only
    pipeline leaves out, ``encode_text``, and ``configure`` (from the VAE config: ``latent_channels``,
    ``temporal_factor``, ``spatial_factor``, ``spatial_multiple``).
    """

    vae_class: ClassVar[str]
    pipeline_class: ClassVar[str]
    pipeline_without: ClassVar[tuple[str, ...]] = ("transformer", "vae")

    def __init__(self, source: str, *, dtype: torch.dtype, device: torch.device, revision: str | None = None):
        self.source = os.path.expanduser(source)
        self.dtype = dtype
        self.device = torch.device(device)
        self.revision = revision
        self.latent_channels = self.temporal_factor = self.spatial_factor = self.spatial_multiple = 0
        self.configure(component_config(self.source, "vae"))
        self._vae = None
        self._pipe = None

    @abstractmethod
    def configure(self, vae: dict) -> None:
        """Read the latent channels and compression factors from the VAE's config."""

    # -- checks -------------------------------------------------------------------------
    def check_video_size(self, height: int, width: int, num_frames: int) -> None:
        """ConfigError unless H, W are multiples of ``spatial_multiple`` and frames are ``temporal_factor`` k + 1."""
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
            self._vae = load_frozen_vae(self.vae_class, self.source, **kw)
        return self._vae

    @property
    def pipe(self):
        """The family's stock pipeline holding only the tokenizer and the text encoder."""
        if self._pipe is None:
            kw = dict(revision=self.revision, dtype=self.dtype, device=self.device)
            self._pipe = load_text_pipeline(self.pipeline_class, self.source, without=self.pipeline_without, **kw)
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
