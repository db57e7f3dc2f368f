"""Wan2.1 / Wan2.2-TI2V, diffusers-native.

Roles load as ``WanTransformer3DModel.from_pretrained(path, subfolder="transformer")``
from a Hub id or a local folder. Training reads only the VAE *config* (its
``latents_mean`` / ``latents_std``) to normalise stored latents, never the VAE
weights; the text encoder is loaded once, on one process, only when a
negative prompt must be encoded.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

import torch

from accel_distill.config.schema import RoleConfig, RunConfig
from accel_distill.config.validate import fail, looks_local
from accel_distill.errors import ConfigError
from accel_distill.families.base import Family, FlowMatchAdapter
from accel_distill.registry import register_family
from accel_distill.roles import RoleHandle


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


class WanAdapter(FlowMatchAdapter):
    """Wan flow-matching primitives with the VAE's per-channel latent normalisation."""

    def __init__(self, flow_shift: float, latent_channels: int, latents_mean: list[float], latents_std: list[float]):
        super().__init__(flow_shift, latent_channels)
        self.latents_mean = torch.tensor(latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.latents_std = torch.tensor(latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) on ``device``, copied there once (a host-to-device copy per step would sync)."""
        if device not in self._on_device:
            self._on_device[device] = (self.latents_mean.to(device), self.latents_std.to(device))
        return self._on_device[device]

    def normalize_latents(self, raw: torch.Tensor) -> torch.Tensor:
        # WanPipeline decodes with latents * std + mean, so training sees (raw - mean) / std.
        mean, std = self._stats(raw.device)
        return (raw.float() - mean) / std

    def denormalize_latents(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(x.device)
        return x.float() * std + mean

    def _forward(self, role: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return role.transformer(
            hidden_states=x_t.to(role.dtype),
            timestep=t.to(torch.float32),
            encoder_hidden_states=cond.to(role.dtype),
            return_dict=False,
        )[0]


@register_family("wan")
class WanFamily(Family):
    """Wan text-to-video transformers (Wan2.1 1.3B/14B, Wan2.2 TI2V-5B)."""

    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        for role, rc in cfg.roles.items():
            index = os.path.join(os.path.expanduser(rc.path), "model_index.json")
            if looks_local(rc.path) and os.path.exists(index):
                with open(index, encoding="utf-8") as f:
                    model_index = json.load(f)
                if (model_index.get("transformer_2") or [None])[0] is not None:
                    fail(
                        cfg.source,
                        f"roles.{role}.path",
                        "two-expert Wan2.2 (transformer_2) models are not supported yet; use a single-transformer model",
                    )
                if not os.path.isdir(os.path.join(os.path.expanduser(rc.path), rc.subfolder)):
                    fail(cfg.source, f"roles.{role}.subfolder", f"no folder {rc.subfolder!r} in {rc.path}")

    def load_module(
        self, role: str, rc: RoleConfig, dtype: torch.dtype, *, empty: bool = False
    ) -> dict[str, torch.nn.Module]:
        from diffusers import WanTransformer3DModel

        source = os.path.expanduser(rc.path) if looks_local(rc.path) else rc.path
        try:
            if empty:  # meta parameters, real buffers; weights arrive from rank 0
                from accelerate import init_empty_weights

                with init_empty_weights(include_buffers=False):
                    model = WanTransformer3DModel.from_config(component_config(source, rc.subfolder)).to(dtype)
            else:
                model = WanTransformer3DModel.from_pretrained(
                    source, subfolder=rc.subfolder, revision=rc.revision, dtype=dtype
                )
        except OSError as e:
            raise ConfigError(
                f"{self.cfg.source}: roles.{role}.path: cannot load a Wan transformer from {rc.path!r} "
                f"({str(e).splitlines()[0]})"
            ) from None
        if rc.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return {"transformer": model}

    def flow_shift(self, source: str) -> float:
        """pipeline_config.flow_shift, else the shift in the source's scheduler config."""
        if self.cfg.pipeline_config.flow_shift is not None:
            return self.cfg.pipeline_config.flow_shift
        sched = component_config(source, "scheduler")
        return float(sched.get("flow_shift") or sched.get("shift") or 1.0)

    def make_adapter(self, source: str) -> WanAdapter:
        vae = component_config(source, "vae")
        transformer = component_config(source, self.cfg.roles["student"].subfolder)
        return WanAdapter(
            flow_shift=self.flow_shift(source),
            latent_channels=int(transformer["in_channels"]),
            latents_mean=vae["latents_mean"],
            latents_std=vae["latents_std"],
        )

    def encode_prompts(self, source: str, prompts: list[str], max_length: int, device: torch.device) -> torch.Tensor:
        from diffusers import WanPipeline

        # UMT5-XXL is ~11 GB in bf16: half precision on accelerators, fp32 on CPU. Loaded once per call.
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        pipe = WanPipeline.from_pretrained(source, transformer=None, vae=None, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe.text_encoder.to(device)
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(
                list(prompts), do_classifier_free_guidance=False, max_sequence_length=max_length, device=device
            )
        return embeds.float().cpu()

    def latent_shape(self, source: str, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        vae = component_config(source, "vae")
        ft, fs = int(vae.get("scale_factor_temporal", 4)), int(vae.get("scale_factor_spatial", 8))
        return (int(vae["z_dim"]), (num_frames - 1) // ft + 1, height // fs, width // fs)
