"""What every model family provides: role loading and an adapter of primitives.

A family knows how to load its diffusers components and how to call them; it
knows nothing about algorithms or the training loop. The adapter turns a
loaded role into the primitives methods consume (noise, predictions, CFG,
conversions), so a method never touches a model's call signature.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

import torch

from accel_distill.config.schema import RoleConfig, RunConfig
from accel_distill.errors import ConfigError
from accel_distill.roles import RoleHandle


class FlowMatchAdapter(ABC):
    """Rectified-flow primitives: x_t = (1 - s) x0 + s noise with s = t / T, v = noise - x0.

    Subclasses implement :meth:`_forward` (the model call) and the latent
    normalisation of their VAE.
    """

    capabilities: frozenset[str] = frozenset({"flow_prediction", "x0_prediction", "cfg"})
    num_train_timesteps: int = 1000

    def __init__(self, flow_shift: float, latent_channels: int):
        self.flow_shift = float(flow_shift)
        self.latent_channels = latent_channels

    # --- timesteps -----------------------------------------------------------------
    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Noise level s = t / T of per-sample timesteps ``t`` [B], shaped to broadcast over ``like``."""
        s = t.to(torch.float32) / self.num_train_timesteps
        return s.view(-1, *([1] * (like.dim() - 1)))

    def shift_sigma(self, s: torch.Tensor) -> torch.Tensor:
        """The family's timestep shift, as diffusers' flow-matching schedulers apply it."""
        k = self.flow_shift
        return k * s / (1 + (k - 1) * s)

    def timesteps_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Map u in [0, 1] to shifted timesteps in [0, T]."""
        return self.shift_sigma(u) * self.num_train_timesteps

    # --- noise and conversions ------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.sigma(t, x0)
        return (1 - s) * x0 + s * noise

    def flow_target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def flow_to_x0(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t - self.sigma(t, x_t) * v

    def flow_to_eps(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t + (1 - self.sigma(t, x_t)) * v

    def x0_to_flow(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x_t - x0) / self.sigma(t, x_t).clamp_min(1e-8)

    # --- model calls ----------------------------------------------------------------
    @abstractmethod
    def _forward(self, role: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Call the role's model; returns its raw (flow) prediction."""

    def predict_flow(self, role: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The role's flow (velocity) prediction in float32."""
        return self._forward(role, x_t, t, cond).float()

    def predict_x0(self, role: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.flow_to_x0(self.predict_flow(role, x_t, t, cond), x_t, t)

    def predict_flow_cfg(
        self,
        role: RoleHandle,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        neg_cond: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        """Classifier-free guidance: v = v_neg + g (v_cond - v_neg), diffusers' convention.

        g = 1 is the plain conditional prediction (one pass); otherwise the
        conditional and negative halves run as one batch of 2B.
        """
        if guidance_scale == 1.0:
            return self.predict_flow(role, x_t, t, cond)
        v = self.predict_flow(role, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, neg_cond]))
        v_cond, v_neg = v.chunk(2)
        return v_neg + guidance_scale * (v_cond - v_neg)

    def predict_x0_cfg(self, role, x_t, t, cond, neg_cond, guidance_scale: float) -> torch.Tensor:
        v = self.predict_flow_cfg(role, x_t, t, cond, neg_cond, guidance_scale)
        return self.flow_to_x0(v, x_t, t)

    # --- latents --------------------------------------------------------------------
    def normalize_latents(self, raw: torch.Tensor) -> torch.Tensor:
        """Stored (un-normalised VAE) latents -> the model's latent space, float32."""
        return raw.float()

    def denormalize_latents(self, x: torch.Tensor) -> torch.Tensor:
        return x


class MediaEncoder(Protocol):
    """A family's VAE + text encoder for preprocessing (``python -m accel_distill.preprocess``).

    Latents are the VAE posterior's mode, un-normalised (training normalises);
    text embeddings hold the real tokens only, ``[L, D]`` (readers zero-pad).
    """

    source: str

    def check_video_size(self, height: int, width: int, num_frames: int) -> None:
        """ConfigError unless the model can encode clips of this size."""

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """The stored latent's shape for a clip of this size."""

    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, F, H, W]`` in [-1, 1] -> un-normalised latents, on CPU."""

    def encode_text(self, prompts: Sequence[str], max_length: int) -> list[torch.Tensor]:
        """One ``[L_i, D]`` embedding per prompt (real tokens, at least one row), on CPU."""


class Family(ABC):
    """Loads one model family's roles and builds its adapter. Subclass and register."""

    name: str = ""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        """Family-specific checks on the config, before any weights load."""
        return None

    @abstractmethod
    def load_module(
        self, role: str, rc: RoleConfig, dtype: torch.dtype, *, empty: bool = False
    ) -> dict[str, torch.nn.Module]:
        """Load the role's modules, e.g. ``{"transformer": ...}``; ``empty``: meta weights, real buffers."""

    @abstractmethod
    def make_adapter(self, source: str) -> FlowMatchAdapter:
        """The adapter for models loaded from ``source`` (normalisation, shift, channels)."""

    @classmethod
    def media_encoder(
        cls, source: str, *, dtype: torch.dtype, device: torch.device, revision: str | None = None
    ) -> MediaEncoder:
        """The preprocessing encoder for models from ``source`` (lazy: weights load on first use)."""
        raise ConfigError(f"--family {cls.name!r}: no preprocessing encoder for this family yet")

    @abstractmethod
    def encode_prompts(self, source: str, prompts: list[str], max_length: int, device: torch.device) -> torch.Tensor:
        """Encode prompts with the family's text encoder (loaded once) -> [N, max_length, D]."""

    @abstractmethod
    def latent_shape(self, source: str, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """Latent [C, T, H, W] of a video of the given size (data-free rollouts)."""
