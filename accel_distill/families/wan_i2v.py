"""Image-to-video Wan: Wan2.1 I2V (``wan_i2v``) and Wan2.2 TI2V-5B (``wan_ti2v``), diffusers-native.

Both condition every role on the first frame of the data's video, exactly as
``WanImageToVideoPipeline`` conditions on the user's image, so the exported student samples
with the stock pipeline:

* ``wan_i2v`` (Wan2.1-I2V-14B, also Wan2.2-I2V-A14B's two experts): the transformer takes 36
  channels, the noisy latent + ``condition`` = a 4-channel mask (1 on the first latent frame) + the
  VAE latent of the video ``[image, 0, 0, ...]``; models with an ``image_dim`` (Wan2.1) also take
  CLIP image embeddings (the image encoder's penultimate hidden states) next to the text.
* ``wan_ti2v`` (``expand_timesteps: true`` in ``model_index.json``): the first latent frame *is*
  the image's latent (``(1 - mask) * condition + mask * latents`` before every call and after the
  last step) and its tokens get timestep 0, every other token ``t``.

Columns (written by ``python -m accel_distill.preprocess videos --family wan_i2v|wan_ti2v``, read
through ``extra_tensor_columns``), un-normalised like ``vae_latent``: ``image_latent``
``[C, T, h, w]`` and ``image_embeds`` ``[N, D]`` (``wan_i2v``), ``first_frame_latent`` ``[C, 1, h, w]``
(``wan_ti2v``). The unconditional (negative) variant keeps the image and swaps the text, as the
stock pipeline's classifier-free guidance does.
"""

from __future__ import annotations

import torch

from accel_distill.config.schema import RoleConfig, RunConfig
from accel_distill.config.validate import fail
from accel_distill.errors import ConfigError, DataError
from accel_distill.families.base import Conditioning
from accel_distill.families.wan import (
    WanAdapter,
    WanEncoder,
    WanFamily,
    component_config,
    model_index,
    role_source,
    role_transformer_config,
)
from accel_distill.registry import register_family

IMAGE_LATENT = "image_latent"  # wan_i2v: VAE latent of [first frame, zeros...], the video's length
IMAGE_EMBEDS = "image_embeds"  # wan_i2v with an image encoder: CLIP penultimate hidden states
FIRST_FRAME_LATENT = "first_frame_latent"  # wan_ti2v: VAE latent of the first frame alone
TEXT_CONTEXT = 512  # diffusers' Wan attention splits image tokens off at (tokens - 512) when it has add_k_proj


def pipeline_normalized(adapter: WanAdapter, raw: torch.Tensor) -> torch.Tensor:
    """A conditioning latent normalised with the stock pipeline's arithmetic, ``(x - mean) * (1 / std)``
    (``normalize_latents`` divides, which differs in the last bit)."""
    mean, std = adapter._stats(raw.device)
    return (raw.float() - mean) * (1.0 / std)


def check_like_latents(batch: dict, name: str, expected: tuple[int, ...]) -> None:
    """DataError (naming the sample) unless the conditioning tensor ``name`` has the shape ``expected``."""
    got = tuple(batch[name].shape[1:])
    if got != expected:
        ids = batch.get("ids") or ["?"]
        raise DataError(f"sample {ids[0]!r}: {name!r} has shape {list(got)}, this latent needs {list(expected)}")


def check_video_size(x_t: torch.Tensor, condition: torch.Tensor, name: str) -> None:
    """DataError unless the conditioning fits the latent being denoised (a data-free rollout takes its size
    from pipeline_config.num_frames / height / width, the conditioning from the data)."""
    frames = x_t.shape[2] if name == IMAGE_LATENT else 1
    if (condition.shape[2], *condition.shape[3:]) != (frames, *x_t.shape[3:]):
        raise DataError(
            f"{name!r} has {list(condition.shape[2:])} latent frames x height x width, the rollout's latent "
            f"{list(x_t.shape[2:])}: set pipeline_config.num_frames / height / width to the data's video size"
        )


class WanI2VAdapter(WanAdapter):
    """Wan2.1 I2V: ``[x_t, mask, image latent]`` on the channels, CLIP image embeddings beside the text."""

    def __init__(self, *args, mask_channels: int, image_embeds: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_channels = mask_channels  # the VAE's temporal factor: the mask of each latent frame's frames
        self.image_embeds = image_embeds

    def conditioning(self, batch: dict) -> Conditioning:
        raw = batch[IMAGE_LATENT]
        if "latents" in batch:
            check_like_latents(batch, IMAGE_LATENT, tuple(batch["latents"].shape[1:]))
        latent = pipeline_normalized(self, raw)
        b, _, frames, h, w = latent.shape
        # WanImageToVideoPipeline.prepare_latents: 1 on the (repeated) first frame, 0 on the rest
        mask = torch.zeros((b, self.mask_channels, frames, h, w), dtype=torch.float32, device=latent.device)
        mask[:, :, 0] = 1
        cond = {**super().conditioning(batch), "image_condition": torch.cat([mask, latent], dim=1)}
        if self.image_embeds:
            cond["image_embeds"] = batch[IMAGE_EMBEDS]
        return cond

    def model_inputs(self, dtype, x_t, t, cond) -> dict:
        kwargs = super().model_inputs(dtype, x_t, t, cond)
        check_video_size(x_t, cond["image_condition"], IMAGE_LATENT)
        kwargs["hidden_states"] = torch.cat([x_t, cond["image_condition"]], dim=1).to(dtype)
        if "image_embeds" in cond:
            kwargs["encoder_hidden_states_image"] = cond["image_embeds"].to(dtype)
        return kwargs


class WanTI2VAdapter(WanAdapter):
    """Wan2.2 TI2V-5B: the first latent frame is the image's, at timestep 0; the rest is denoised.

    The network's output on the given frame means nothing (the stock pipeline discards it); the
    prediction returned there is the one that implies exactly the image latent, so the first frame
    adds no gradient and every x0 starts with the image (and no loss either where the data's first
    latent frame is the image's latent: the causal VAE codes the first frame alone).
    """

    def conditioning(self, batch: dict) -> Conditioning:
        if "latents" in batch:
            c, _, h, w = batch["latents"].shape[1:]
            check_like_latents(batch, FIRST_FRAME_LATENT, (c, 1, h, w))
        return {**super().conditioning(batch), "first_frame": pipeline_normalized(self, batch[FIRST_FRAME_LATENT])}

    def token_mask(self, x_t: torch.Tensor) -> torch.Tensor:
        mask = super().token_mask(x_t)
        mask[:, :, 0] = 0  # WanImageToVideoPipeline's first_frame_mask
        return mask

    def with_first_frame(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``x`` with its first latent frame replaced by the image's (the pipeline does it before each
        call and after the last step: apply it to a finished sample)."""
        mask = self.token_mask(x)
        return (1 - mask) * cond["first_frame"] + mask * x

    def model_inputs(self, dtype, x_t, t, cond) -> dict:
        kwargs = super().model_inputs(dtype, x_t, t, cond)
        check_video_size(x_t, cond["first_frame"], FIRST_FRAME_LATENT)
        kwargs["hidden_states"] = self.with_first_frame(x_t, cond).to(dtype)
        return kwargs

    def _forward(self, module, dtype, x_t, t, cond) -> torch.Tensor:
        pred = super()._forward(module, dtype, x_t, t, cond)
        given = self.noise.from_x0(cond["first_frame"], x_t[:, :, :1].float(), t)
        return torch.cat([given.to(pred.dtype), pred[:, :, 1:]], dim=2)


def _index(rc: RoleConfig) -> dict:
    return model_index(rc.path, rc.revision) or {}


def refuse_validation(cfg: RunConfig) -> None:
    if cfg.training.log_validation:
        fail(
            cfg.source,
            "training.log_validation",
            f"not supported for recipe.family {cfg.recipe.family} yet (validation prompts carry no conditioning "
            "image); sample the export with the stock pipeline instead",
        )


@register_family("wan_i2v")
class WanI2VFamily(WanFamily):
    """Wan image-to-video with a 36-channel transformer (Wan2.1 I2V 14B; Wan2.2 I2V A14B's two experts).

    Sampled by ``WanImageToVideoPipeline``; models whose transformer has an ``image_dim`` also read
    CLIP image embeddings (``image_embeds``).
    """

    adapter_class = WanI2VAdapter

    @classmethod
    def uses_image_embeds(cls, cfg: RunConfig) -> bool:
        return role_transformer_config(cfg, next(iter(cfg.roles))).get("image_dim") is not None

    @classmethod
    def extra_tensor_columns(cls, cfg: RunConfig) -> tuple[str, ...]:
        return (IMAGE_LATENT, IMAGE_EMBEDS) if cls.uses_image_embeds(cfg) else (IMAGE_LATENT,)

    @classmethod
    def check_model(cls, cfg: RunConfig, role: str, rc: RoleConfig) -> None:
        t = role_transformer_config(cfg, role)
        key = f"roles.{role}.path"
        if _index(rc).get("expand_timesteps"):
            fail(cfg.source, key, f"{rc.path} is Wan2.2 TI2V (expand_timesteps): use recipe.family wan_ti2v")
        vae = component_config(role_source(rc), "vae")
        z, mask = int(vae["z_dim"]), int(vae.get("scale_factor_temporal", 4))
        want = t["out_channels"] + mask + z
        if t["in_channels"] != want:
            layout = f"wan_i2v needs latent {t['out_channels']} + mask {mask} + image latent {z} = {want}"
            what = "a text-to-video model" if t["in_channels"] == t["out_channels"] else "not an image-to-video Wan"
            hint = ": use recipe.family wan" if t["in_channels"] == t["out_channels"] else ""
            fail(cfg.source, key, f"{rc.path} is {what} ({t['in_channels']} input channels; {layout}){hint}")
        if t.get("added_kv_proj_dim") is not None and cfg.pipeline_config.text_max_length != TEXT_CONTEXT:
            fail(
                cfg.source,
                "pipeline_config.text_max_length",
                f"must be {TEXT_CONTEXT} for {rc.path} (its image attention takes the text as the last "
                f"{TEXT_CONTEXT} tokens), got {cfg.pipeline_config.text_max_length}",
            )

    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        super().validate_config(cfg)
        with_clip = {role: role_transformer_config(cfg, role).get("image_dim") for role in cfg.roles}
        if len(set(with_clip.values())) > 1:
            detail = ", ".join(f"{r}: {d}" for r, d in with_clip.items())
            fail(cfg.source, "roles", f"every role must take the same image embeddings (image_dim {detail})")
        refuse_validation(cfg)

    def adapter_kwargs(self, role: str) -> dict:
        rc = self.cfg.roles[role]
        vae = component_config(role_source(rc), "vae")
        return {
            **super().adapter_kwargs(role),
            "mask_channels": int(vae.get("scale_factor_temporal", 4)),
            "image_embeds": self.uses_image_embeds(self.cfg),
        }

    @classmethod
    def media_encoder(cls, source, *, dtype, device, revision=None) -> WanI2VEncoder:
        return WanI2VEncoder(source, dtype=dtype, device=device, revision=revision)


@register_family("wan_ti2v")
class WanTI2VFamily(WanFamily):
    """Wan2.2 TI2V-5B image-to-video (``expand_timesteps``): the export is a ``WanImageToVideoPipeline``."""

    adapter_class = WanTI2VAdapter

    @classmethod
    def extra_tensor_columns(cls, cfg: RunConfig) -> tuple[str, ...]:
        return (FIRST_FRAME_LATENT,)

    @classmethod
    def check_model(cls, cfg: RunConfig, role: str, rc: RoleConfig) -> None:
        super().check_model(cfg, role, rc)  # a latent-width input: no image channels
        if not _index(rc).get("expand_timesteps"):
            fail(
                cfg.source,
                f"roles.{role}.path",
                f"{rc.path} is not Wan2.2 TI2V: its model_index.json has no expand_timesteps: true "
                "(Wan2.1 / Wan2.2 I2V: recipe.family wan_i2v; text-to-video: wan)",
            )

    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        super().validate_config(cfg)
        refuse_validation(cfg)

    def export_index_updates(self, modules, index: dict) -> dict:
        # the student is image-conditioned: DiffusionPipeline.from_pretrained(export) is the I2V pipeline
        return {**super().export_index_updates(modules, index), "_class_name": "WanImageToVideoPipeline"}

    @classmethod
    def media_encoder(cls, source, *, dtype, device, revision=None) -> WanTI2VEncoder:
        return WanTI2VEncoder(source, dtype=dtype, device=device, revision=revision)


class WanI2VEncoder(WanEncoder):
    """Adds the first frame's conditioning to :class:`WanEncoder`: the latent of ``[image, zeros...]`` and,
    for a transformer with ``image_dim``, CLIP embeddings, computed with the stock pipeline's own code.

    The first frame (resized and cropped like the clip) goes through ``VideoProcessor.preprocess`` as a
    PIL image, then the VAE (posterior mode) and ``WanImageToVideoPipeline.encode_image`` (image encoder
    in fp32, as diffusers' examples load it), one clip at a time: what the pipeline computes from that image.
    """

    latent_column = IMAGE_LATENT
    full_length = True  # the conditioning video has the clip's length: the image, then zeros

    def __init__(self, source: str, *, dtype: torch.dtype, device: torch.device, revision: str | None = None):
        super().__init__(source, dtype=dtype, device=device, revision=revision)
        self.check_model()

    def check_model(self) -> None:
        t = component_config(self.source, "transformer")
        want = self.latent_channels + self.temporal_factor + self.latent_channels
        if t["in_channels"] != want or (model_index(self.source, self.revision) or {}).get("expand_timesteps"):
            raise ConfigError(
                f"--model {self.source}: not a Wan2.1 / Wan2.2 I2V model ({t['in_channels']} input channels, "
                f"wan_i2v needs {want}; Wan2.2 TI2V: --family wan_ti2v; text-to-video: --family wan)"
            )
        self.with_image_embeds = t.get("image_dim") is not None

    @property
    def image_pipe(self):
        """A WanImageToVideoPipeline holding only the image encoder and processor (fp32)."""
        if getattr(self, "_image_pipe", None) is None:
            from diffusers import WanImageToVideoPipeline

            none = dict.fromkeys(("transformer", "transformer_2", "vae", "text_encoder", "tokenizer"))
            try:
                pipe = WanImageToVideoPipeline.from_pretrained(
                    self.source, **none, revision=self.revision, dtype=torch.float32
                )
            except (OSError, ValueError) as e:
                raise ConfigError(
                    f"--model {self.source}: cannot load the image encoder ({str(e).splitlines()[0]})"
                ) from None
            if pipe.image_encoder is None or pipe.image_processor is None:
                raise ConfigError(
                    f"--model {self.source}: its transformer takes image embeddings but it has no "
                    "image_encoder / image_processor"
                )
            pipe.image_encoder.to(self.device).eval().requires_grad_(False)
            self._image_pipe = pipe
        return self._image_pipe

    @property
    def video_processor(self):
        from diffusers.video_processor import VideoProcessor

        return VideoProcessor(vae_scale_factor=self.spatial_factor)

    @torch.no_grad()
    def encode_conditioning(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        from PIL import Image

        out: dict[str, list[torch.Tensor]] = {self.latent_column: []}
        for clip in frames:
            num_frames, height, width = clip.shape[:3]
            image = Image.fromarray(clip[0].numpy())
            pixels = self.video_processor.preprocess(image, height=height, width=width).unsqueeze(2)
            if self.full_length:  # WanImageToVideoPipeline.prepare_latents' video_condition
                zeros = pixels.new_zeros(pixels.shape[0], pixels.shape[1], num_frames - 1, height, width)
                pixels = torch.cat([pixels, zeros], dim=2)
            out[self.latent_column].append(self.encode_video(pixels)[0])
            if self.with_image_embeds:
                embeds = self.image_pipe.encode_image(image, self.device)[0]
                out.setdefault(IMAGE_EMBEDS, []).append(embeds.cpu())
        return {name: torch.stack(tensors) for name, tensors in out.items()}


class WanTI2VEncoder(WanI2VEncoder):
    """Wan2.2 TI2V-5B: the latent of the first frame alone (no image encoder)."""

    latent_column = FIRST_FRAME_LATENT
    full_length = False

    def check_model(self) -> None:
        if not (model_index(self.source, self.revision) or {}).get("expand_timesteps"):
            raise ConfigError(
                f"--model {self.source}: not Wan2.2 TI2V (its model_index.json has no expand_timesteps: true; "
                "Wan2.1 / Wan2.2 I2V: --family wan_i2v)"
            )
        self.with_image_embeds = False
