"""CogVideoX (THUDM/CogVideoX-2b, CogVideoX-5b), diffusers-native.

What differs from Wan, and where it lives:

* Noise: DDPM with v-prediction (:class:`~accel_distill.noise.DDPMVPrediction`), its
  ``alphas_cumprod`` those of the model's own scheduler config (scaled-linear betas, the
  ``snr_shift_scale`` -- 3.0 for 2b, 1.0 for 5b -- and zero terminal SNR). A few-step student
  exports ``CogVideoXDDIMScheduler`` re-spaced so that stock ``CogVideoXPipeline`` visits exactly
  the trained timesteps; its steps are deterministic DDIM (``pipeline_config.sampler_kind: ode``).
* Latents: stored ``[C, T, H, W]`` like every family; the methods see ``[B, C, T, H, W]`` times the
  VAE's ``scaling_factor`` (the pipeline decodes ``latents / scaling_factor``); the transformer call
  transposes to the model's ``[B, T, C, H, W]`` and back.
* Text: T5 over exactly ``max_text_seq_length`` (226) tokens with no attention mask, so the padding
  positions carry embeddings the model was trained with: the encoder stores every row, and
  ``pipeline_config.text_max_length`` must equal the transformer's ``max_text_seq_length``.
* Rotary position embeddings (5b: ``use_rotary_positional_embeddings``) are computed from the latent
  video size exactly as ``CogVideoXPipeline`` computes ``image_rotary_emb``, once per size and device.
* Its own VAE (``AutoencoderKLCogVideoX``: 8x spatial, 4x temporal, clips of 4k+1 frames).

Not supported yet: CogVideoX 1.5 (``patch_size_t``) and image-to-video models (image latents as
extra input channels, ``ofs`` embeddings); both are refused when the config is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from accel_distill.config.schema import RoleConfig, RunConfig
from accel_distill.config.validate import fail
from accel_distill.errors import ConfigError
from accel_distill.families.base import Family, ModelAdapter
from accel_distill.families.encoder_loading import LazyEncoders
from accel_distill.families.wan import check_subfolder, component_config, role_config, role_source
from accel_distill.noise import DDPMVPrediction
from accel_distill.precision import half_dtype_for
from accel_distill.prompts import pad_tokens
from accel_distill.registry import METHODS, register_family


class CogVideoXEncoder(LazyEncoders):
    """CogVideoX's VAE + T5 text encoder from a diffusers folder or Hub id (weights load on first use); Wan's
    size rules fit it (a 4x temporal, 8x spatial VAE and patch 2), text-to-video (no extra conditioning)."""

    vae_class = "AutoencoderKLCogVideoX"
    pipeline_class = "CogVideoXPipeline"

    def configure(self, vae: dict) -> None:
        self.latent_channels = int(vae["latent_channels"])
        self.temporal_factor = int(vae.get("temporal_compression_ratio", 4))
        self.spatial_factor = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
        try:  # a VAE + text encoder folder is enough
            patch = int(component_config(self.source, "transformer").get("patch_size") or 2)
        except ConfigError:
            patch = 2
        self.spatial_multiple = self.spatial_factor * patch

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str], max_length: int) -> list[torch.Tensor]:
        """One ``[max_length, D]`` embedding per prompt, padding rows included (see the module doc), on CPU."""
        embeds, _ = self.pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
            device=self.device,
            dtype=self.dtype,
        )
        return [e.clone() for e in embeds.cpu()]


class CogVideoXAdapter(ModelAdapter):
    """CogVideoX over DDPM v-prediction: latents scaled by the VAE's ``scaling_factor``, the transformer
    called in its ``[B, T, C, H, W]`` layout with the pipeline's rotary embeddings."""

    def __init__(self, noise: DDPMVPrediction, latent_channels: int, scaling_factor: float, transformer: dict):
        super().__init__(noise, latent_channels)
        self.scaling_factor = float(scaling_factor)
        self.text_dim = int(transformer["text_embed_dim"])
        self.patch_size = int(transformer["patch_size"])
        self.head_dim = int(transformer["attention_head_dim"])
        self.base_grid = (
            int(transformer["sample_height"]) // self.patch_size,
            int(transformer["sample_width"]) // self.patch_size,
        )
        self.rotary = bool(transformer.get("use_rotary_positional_embeddings"))
        self._rotary: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def normalize_latents(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.float() * self.scaling_factor

    def denormalize_latents(self, x: torch.Tensor) -> torch.Tensor:
        return 1 / self.scaling_factor * x.float()  # CogVideoXPipeline.decode_latents

    def rotary_embeddings(self, frames: int, height: int, width: int, device: torch.device):
        """``image_rotary_emb`` (cos, sin) of a latent video ``[frames, height, width]`` as CogVideoXPipeline
        computes it (CogVideoX 1.0), or None for models without rotary positions."""
        if not self.rotary:
            return None
        key = (frames, height, width, device)
        if key not in self._rotary:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            grid = (height // self.patch_size, width // self.patch_size)
            base_height, base_width = self.base_grid
            self._rotary[key] = get_3d_rotary_pos_embed(
                embed_dim=self.head_dim,
                crops_coords=get_resize_crop_region_for_grid(grid, base_width, base_height),
                grid_size=grid,
                temporal_size=frames,
                device=device,
            )
        return self._rotary[key]

    def _forward(self, module, dtype, x_t, t, cond) -> torch.Tensor:
        _, _, frames, height, width = x_t.shape
        out = module(
            hidden_states=x_t.transpose(1, 2).contiguous().to(dtype),  # [B, T, C, H, W]
            encoder_hidden_states=cond["text"].to(dtype),
            timestep=t,
            image_rotary_emb=self.rotary_embeddings(frames, height, width, x_t.device),
            return_dict=False,
        )[0]
        return out.transpose(1, 2)


def _alphas_config(config: dict) -> dict:
    """The scheduler settings that decide ``alphas_cumprod`` (not the timestep spacing)."""
    spacing = ("timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample", "clip_sample_range")
    return {k: v for k, v in config.items() if k not in spacing}


@register_family("cogvideox")
class CogVideoXFamily(Family):
    """CogVideoX 1.0 text-to-video transformers (2b: sin-cos positions, 5b: rotary positions)."""

    noise_class = DDPMVPrediction
    vae_class = "AutoencoderKLCogVideoX"

    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        src, p = cfg.source, cfg.pipeline_config
        if p.flow_shift is not None:
            fail(src, "pipeline_config.flow_shift", "CogVideoX is a DDPM (v-prediction) model without a flow shift")
        if p.boundary_ratio is not None:
            fail(src, "pipeline_config.boundary_ratio", "CogVideoX has one transformer (no second expert)")
        lengths, spaces = set(), {}
        for role, rc in cfg.roles.items():
            check_subfolder(cfg, role)
            transformer = role_config(cfg, role, rc.subfolder)
            vae, scheduler = role_config(cfg, role, "vae"), role_config(cfg, role, "scheduler")
            key = f"roles.{role}.path"
            if transformer.get("patch_size_t") is not None:
                fail(src, key, f"{rc.path}: CogVideoX 1.5 (patch_size_t) is not supported yet")
            channels, latent = int(transformer["in_channels"]), int(vae["latent_channels"])
            if channels != latent or transformer.get("ofs_embed_dim"):
                fail(
                    src,
                    key,
                    f"{rc.path}: image-to-video CogVideoX (in_channels {channels}, VAE {latent}) is not supported yet",
                )
            if scheduler.get("prediction_type") != "v_prediction":
                fail(
                    src,
                    key,
                    f"{rc.path}: scheduler prediction_type {scheduler.get('prediction_type')!r}, expected v_prediction",
                )
            lengths.add(int(transformer.get("max_text_seq_length", 226)))
            spaces[role] = (vae.get("scaling_factor"), DDPMVPrediction(scheduler).config)
        first = next(iter(spaces))
        for role, space in spaces.items():  # one adapter and one noise schedule serve every role
            if space[0] != spaces[first][0] or _alphas_config(space[1]) != _alphas_config(spaces[first][1]):
                fail(
                    src,
                    f"roles.{role}.path",
                    f"{cfg.roles[role].path}: its VAE scaling_factor or scheduler betas differ from roles.{first}'s "
                    "(every role must share the latent space and noise schedule, e.g. CogVideoX-2b with 2b)",
                )
        if len(lengths) == 1 and p.text_max_length not in lengths:
            (length,) = lengths
            fail(
                src,
                "pipeline_config.text_max_length",
                f"must be {length} for this model, got {p.text_max_length} (its transformer's max_text_seq_length: "
                "CogVideoXPipeline runs T5 over exactly that many tokens, padding included)",
            )

    @classmethod
    def noise_schedule(cls, cfg: RunConfig, role: str) -> DDPMVPrediction:
        """The DDPM schedule of ``role``'s model, from its scheduler config."""
        return DDPMVPrediction(role_config(cfg, role, "scheduler"))

    @classmethod
    def few_step_schedule(cls, cfg: RunConfig, steps, *, key: str, tolerance: float, kind: str):
        if kind != "ode":
            fail(
                cfg.source,
                "pipeline_config.sampler_kind",
                f"{kind!r}: a CogVideoX student samples with CogVideoXDDIMScheduler's deterministic DDIM steps "
                "(no stock CogVideoX scheduler re-noises x0 between steps); set sampler_kind: ode",
            )
        noise = cls.noise_schedule(cfg, METHODS[cfg.recipe.method].product_role)
        return noise.fit_few_step(steps, key=key, tolerance=tolerance, kind=kind)

    def load_module(
        self, role: str, rc: RoleConfig, dtype: torch.dtype, *, empty: bool = False
    ) -> dict[str, torch.nn.Module]:
        from diffusers import CogVideoXTransformer3DModel

        source = role_source(rc)
        try:
            if empty:  # meta parameters, real buffers; weights arrive from rank 0
                from accelerate import init_empty_weights

                with init_empty_weights(include_buffers=False):
                    config = component_config(source, rc.subfolder)
                    model = CogVideoXTransformer3DModel.from_config(config).to(dtype)
            else:
                model = CogVideoXTransformer3DModel.from_pretrained(
                    source, subfolder=rc.subfolder, revision=rc.revision, dtype=dtype
                )
        except OSError as e:
            raise ConfigError(
                f"{self.cfg.source}: roles.{role}.path: cannot load a CogVideoX transformer from {rc.path!r} "
                f"({str(e).splitlines()[0]})"
            ) from None
        if rc.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return {"transformer": model}

    def make_adapter(self, role: str) -> CogVideoXAdapter:
        rc = self.cfg.roles[role]
        transformer = role_config(self.cfg, role, rc.subfolder)
        return CogVideoXAdapter(
            self.noise_schedule(self.cfg, role),
            latent_channels=int(transformer["in_channels"]),
            scaling_factor=role_config(self.cfg, role, "vae")["scaling_factor"],
            transformer=transformer,
        )

    @classmethod
    def media_encoder(
        cls, source: str, *, dtype: torch.dtype, device: torch.device, revision: str | None = None
    ) -> CogVideoXEncoder:
        return CogVideoXEncoder(source, dtype=dtype, device=device, revision=revision)

    def encode_prompts(self, source: str, prompts: list[str], max_length: int, device: torch.device) -> torch.Tensor:
        encoder = self.media_encoder(source, dtype=half_dtype_for(device), device=device)
        return torch.stack([pad_tokens(e, max_length) for e in encoder.encode_text(prompts, max_length)])

    def latent_shape(self, source: str, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        return self.media_encoder(source, dtype=torch.float32, device=torch.device("cpu")).latent_shape(
            num_frames, height, width
        )
