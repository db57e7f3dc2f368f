"""LTX-Video (Lightricks/LTX-Video), diffusers-native.

What differs from Wan, and where it lives:

* Tokens: the transformer takes packed latents ``[B, T*H*W / p^2 p_t, C p^2 p_t]``; the adapter packs and
  unpacks with ``LTXPipeline._pack_latents`` / ``_unpack_latents``, so the methods keep ``[B, C, T, H, W]``.
  Packing is a permutation, so every sampler step (elementwise) is bitwise the pipeline's.
* Text: T5 with an attention mask. The encoder stores the real tokens only and the reader zero-pads, so
  the mask is "row not all zero" (a real T5 row is never exactly zero); it travels in the conditioning as
  ``text_mask``. Masked tokens get the transformer's ``-10000`` bias, which underflows to exactly 0 in the
  softmax, so the length the pipeline pads to (128) does not change the output: ``text_max_length`` is any
  length holding the longest prompt.
* Rope scaling by video size: ``rope_interpolation_scale = (temporal ratio / frame_rate, spatial ratio,
  spatial ratio)`` from the VAE config, as the pipeline computes it, at its default ``frame_rate`` 25.
* Latents: ``(raw - latents_mean) * scaling_factor / latents_std`` (``LTXPipeline._normalize_latents``);
  ``latents_mean`` / ``latents_std`` are VAE *buffers*, read from the VAE's safetensors (two tensors).
* Sigmas: ``LTXPipeline`` calls ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=...)``; with
  ``use_dynamic_shifting`` false the scheduler ignores ``mu`` and applies ``shift`` / ``shift_terminal`` to
  that spacing. :class:`LTXSchedule` is that scheduler driven that way, and :func:`fit_ltx_schedule` fits
  ``(shift, shift_terminal)`` for it, so a plain stock call (``num_inference_steps=N``) visits exactly the
  trained timesteps. Students step with Euler (``FlowMatchEulerDiscreteScheduler``, ``sampler_kind: ode``):
  the pipeline draws a re-noising scheduler's noise in the packed shape, which ours would not match.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from accel_distill.config.schema import RoleConfig, RunConfig
from accel_distill.config.validate import fail, looks_local
from accel_distill.errors import ConfigError
from accel_distill.families.base import Family, ModelAdapter
from accel_distill.families.encoder_loading import LazyEncoders
from accel_distill.families.wan import WanFamily, check_subfolder, component_config, role_config, role_source
from accel_distill.noise import RectifiedFlow
from accel_distill.registry import register_family
from accel_distill.schedule import NUM_TRAIN_TIMESTEPS, FewStepSchedule, checked_timesteps, max_timestep_error

FRAME_RATE = 25  # LTXPipeline's default frame_rate (its rope_interpolation_scale)


def ltx_sigmas(n: int) -> np.ndarray:
    """The sigmas ``LTXPipeline`` passes to ``set_timesteps`` for ``n`` steps."""
    return np.linspace(1.0, 1 / n, n)


@dataclass(frozen=True)
class LTXSchedule(FewStepSchedule):
    """A stock ``FlowMatchEulerDiscreteScheduler`` (``use_dynamic_shifting`` false) as ``LTXPipeline`` drives it:
    :meth:`make_scheduler`'s ``set_timesteps(n)`` uses the pipeline's spacing ``sigmas=linspace(1, 1/n, n)``
    (the saved config is the stock one; only this in-process instance is told the spacing)."""

    kind: str = "ode"

    def make_scheduler(self):
        sched = super().make_scheduler()
        stock = sched.set_timesteps

        def set_timesteps(num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
            if sigmas is None and timesteps is None:
                sigmas = ltx_sigmas(num_inference_steps)
                num_inference_steps = None  # as retrieve_timesteps calls it
            return stock(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)

        sched.set_timesteps = set_timesteps
        return sched


def _ltx_produced(shift: float, shift_terminal: float | None, n: int) -> list[float] | None:
    sched = LTXSchedule((), shift, shift_terminal).make_scheduler()
    with np.errstate(all="ignore"):
        sched.set_timesteps(n)
    values = [float(t) for t in sched.timesteps.tolist()]
    return values if all(math.isfinite(v) for v in values) else None


def fit_ltx_schedule(steps: Sequence[float], *, key: str, tolerance: float) -> LTXSchedule:
    """``(shift, shift_terminal)`` making ``LTXPipeline``'s sigma spacing give ``steps`` (ConfigError naming ``key``).

    The first sigma is always 1 (t = 1000) and ``shift_terminal`` pins the last, so 1-2 steps are exact
    and longer lists fit ``shift`` (log-grid, then bisection-free refinement around the best point).
    """
    wanted = checked_timesteps(steps, key)
    n = len(wanted)
    terminal = None if n == 1 else wanted[-1] / NUM_TRAIN_TIMESTEPS
    shift = 1.0
    if n > 2:

        def err(log_shift: float) -> float:
            return max_timestep_error(_ltx_produced(math.exp(log_shift), terminal, n), wanted)

        grid = [i * 0.05 for i in range(-120, 121)]
        best = min(grid, key=lambda g: (err(g), abs(g)))
        for width in (0.05, 0.005, 0.0005):  # refine around the best point, finer each round
            best = min((best + width * k / 10 for k in range(-10, 11)), key=lambda g: (err(g), abs(g)))
        shift = math.exp(best)
    produced = _ltx_produced(shift, terminal, n)
    error = max_timestep_error(produced, wanted)
    if produced is None or error > tolerance:
        closest = "none (non-finite)" if produced is None else str([round(t, 1) for t in produced])
        raise ConfigError(
            f"{key}: {n} timesteps {[round(w, 1) for w in wanted]} cannot be produced by stock LTXPipeline "
            f"(sigmas linspace(1, 1/N, N)) with FlowMatchEulerDiscreteScheduler within {tolerance:g}; closest "
            f"expressible is {closest} (max error {error:.1f}); the first must be 1000"
        )
    return LTXSchedule(timesteps=tuple(produced), shift=shift, shift_terminal=terminal, kind="ode")


class LTXFlow(RectifiedFlow):
    """Rectified flow whose stock schedules are spaced as ``LTXPipeline`` spaces them."""

    @classmethod
    def fit_few_step(cls, steps, *, key: str, tolerance: float, kind: str) -> LTXSchedule:
        if kind != "ode":
            raise ConfigError(f"{key}: sampler kind {kind!r}: LTX students step with Euler ('ode')")
        return fit_ltx_schedule(steps, key=key, tolerance=tolerance)

    def many_step_schedule(self) -> LTXSchedule:
        """Euler at this (static) shift with LTXPipeline's spacing; the source's dynamic (``mu``) shift is not
        reproduced (validation of many-step models only)."""
        return LTXSchedule((), shift=self.shift, shift_terminal=None, kind="ode")


def vae_latent_stats(source: str, revision: str | None = None) -> tuple[list[float], list[float]]:
    """The VAE's ``latents_mean`` / ``latents_std`` buffers, read from its safetensors (nothing else loads)."""
    from safetensors import safe_open

    name = "diffusion_pytorch_model.safetensors"
    try:
        if looks_local(source):
            file = os.path.join(os.path.expanduser(source), "vae", name)
        else:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(source, name, subfolder="vae", revision=revision)
        with safe_open(file, framework="pt") as f:
            return f.get_tensor("latents_mean").tolist(), f.get_tensor("latents_std").tolist()
    except Exception as e:  # missing file or buffers: say so, never guess the normalisation
        raise ConfigError(
            f"{source}: cannot read the VAE's latents_mean / latents_std ({str(e).splitlines()[0]})"
        ) from None


def compression_ratios(vae: dict) -> tuple[int, int]:
    """(spatial, temporal) compression of an ``AutoencoderKLLTXVideo`` config, as the VAE computes them."""
    scaling = sum(bool(s) for s in vae.get("spatio_temporal_scaling", (True, True, True, False)))
    spatial = vae.get("spatial_compression_ratio") or int(vae.get("patch_size", 4)) * 2**scaling
    temporal = vae.get("temporal_compression_ratio") or int(vae.get("patch_size_t", 1)) * 2**scaling
    return int(spatial), int(temporal)


class LTXEncoder(LazyEncoders):
    """LTX-Video's VAE + T5 text encoder from a diffusers folder or Hub id (weights load on first use):
    H, W multiples of the spatial ratio (and of 32), frames k t + 1."""

    vae_class = "AutoencoderKLLTXVideo"
    pipeline_class = "LTXPipeline"

    def configure(self, vae: dict) -> None:
        self.latent_channels = int(vae["latent_channels"])
        self.spatial_factor, self.temporal_factor = compression_ratios(vae)
        self.spatial_multiple = max(self.spatial_factor, 32)  # LTXPipeline: height and width divisible by 32

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str], max_length: int) -> list[torch.Tensor]:
        """One ``[L_i, D]`` embedding per prompt: the tokens the pipeline's attention mask keeps, on CPU."""
        embeds, mask, _, _ = self.pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
            device=self.device,
            dtype=self.dtype,
        )
        lengths = mask.sum(dim=1).clamp(min=1).tolist()
        return [e[:n].clone() for e, n in zip(embeds.cpu(), lengths)]


class LTXAdapter(ModelAdapter):
    """LTX-Video over rectified flow: packed tokens, the text mask, rope scaled by the VAE's ratios."""

    def __init__(self, noise: LTXFlow, transformer: dict, vae: dict, latents_mean, latents_std):
        super().__init__(noise, int(transformer["out_channels"]))
        self.patch = (int(transformer.get("patch_size_t", 1)), int(transformer.get("patch_size", 1)))
        spatial, temporal = compression_ratios(vae)
        self.rope_interpolation_scale = (temporal / FRAME_RATE, spatial, spatial)
        self.scaling_factor = float(vae.get("scaling_factor", 1.0))
        self.latents_mean = torch.tensor(latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.latents_std = torch.tensor(latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:  # copied once: a host-to-device copy per step would sync
            self._on_device[device] = (self.latents_mean.to(device), self.latents_std.to(device))
        return self._on_device[device]

    def conditioning(self, batch: dict) -> dict:
        text = batch["text_embeds"]
        return {"text": text, "text_mask": text.abs().amax(dim=-1) > 0}  # real tokens (the reader zero-pads)

    def negative(self, cond: dict, neg_text: torch.Tensor) -> dict:
        text = neg_text.to(cond["text"].dtype).unsqueeze(0).expand(cond["text"].shape[0], *neg_text.shape)
        return {**cond, "text": text, "text_mask": text.abs().amax(dim=-1) > 0}

    def normalize_latents(self, raw: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(raw.device)
        return (raw.float() - mean) * self.scaling_factor / std  # LTXPipeline._normalize_latents

    def denormalize_latents(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(x.device)
        return x.float() * std / self.scaling_factor + mean

    def _forward(self, module, dtype, x_t, t, cond) -> torch.Tensor:
        from diffusers import LTXPipeline

        _, _, frames, height, width = x_t.shape
        pt, p = self.patch
        out = module(
            hidden_states=LTXPipeline._pack_latents(x_t, p, pt).to(dtype),
            encoder_hidden_states=cond["text"].to(dtype),
            timestep=t,
            encoder_attention_mask=cond.get("text_mask", cond["text"].abs().amax(dim=-1) > 0),
            num_frames=frames,
            height=height,
            width=width,
            rope_interpolation_scale=self.rope_interpolation_scale,
            return_dict=False,
        )[0]
        return LTXPipeline._unpack_latents(out, frames // pt, height // p, width // p, p, pt)


@register_family("ltx")
class LTXFamily(Family):
    """LTX-Video text-to-video transformers (0.9.x, ``LTXPipeline``)."""

    noise_class = LTXFlow
    vae_class = "AutoencoderKLLTXVideo"

    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        src, p = cfg.source, cfg.pipeline_config
        if p.boundary_ratio is not None:
            fail(src, "pipeline_config.boundary_ratio", "LTX-Video has one transformer (no second expert)")
        vaes = {}
        for role, rc in cfg.roles.items():
            check_subfolder(cfg, role)
            transformer = role_config(cfg, role, rc.subfolder)
            vae = role_config(cfg, role, "vae")
            if int(transformer["in_channels"]) != int(vae["latent_channels"]):
                fail(
                    src,
                    f"roles.{role}.path",
                    f"{rc.path}: transformer in_channels {transformer['in_channels']} != VAE latent_channels "
                    f"{vae['latent_channels']} (image-to-video LTX is not supported yet)",
                )
            vaes[role] = (compression_ratios(vae), vae.get("scaling_factor"), int(vae["latent_channels"]))
        first = next(iter(vaes))
        for role, space in vaes.items():
            if space != vaes[first]:
                fail(src, f"roles.{role}.path", f"its VAE differs from roles.{first}'s (every role shares the latents)")

    @classmethod
    def few_step_schedule(cls, cfg: RunConfig, steps, *, key: str, tolerance: float, kind: str):
        if kind != "ode":
            fail(
                cfg.source,
                "pipeline_config.sampler_kind",
                f"{kind!r}: an LTX student samples with FlowMatchEulerDiscreteScheduler's Euler steps (LTXPipeline "
                "draws a re-noising scheduler's noise in its packed layout); set sampler_kind: ode",
            )
        return fit_ltx_schedule(steps, key=key, tolerance=tolerance)

    def load_module(
        self, role: str, rc: RoleConfig, dtype: torch.dtype, *, empty: bool = False
    ) -> dict[str, torch.nn.Module]:
        from diffusers import LTXVideoTransformer3DModel

        source = role_source(rc)
        try:
            if empty:  # meta parameters, real buffers; weights arrive from rank 0
                from accelerate import init_empty_weights

                with init_empty_weights(include_buffers=False):
                    model = LTXVideoTransformer3DModel.from_config(component_config(source, rc.subfolder)).to(dtype)
            else:
                model = LTXVideoTransformer3DModel.from_pretrained(
                    source, subfolder=rc.subfolder, revision=rc.revision, dtype=dtype
                )
        except OSError as e:
            raise ConfigError(
                f"{self.cfg.source}: roles.{role}.path: cannot load an LTX-Video transformer from {rc.path!r} "
                f"({str(e).splitlines()[0]})"
            ) from None
        if rc.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return {"transformer": model}

    def flow_shift(self) -> float:
        """pipeline_config.flow_shift (training timesteps, many-step validation), else 1 (LTX's static shift)."""
        return 1.0 if self.cfg.pipeline_config.flow_shift is None else self.cfg.pipeline_config.flow_shift

    def make_adapter(self, role: str) -> LTXAdapter:
        rc = self.cfg.roles[role]
        mean, std = vae_latent_stats(role_source(rc), rc.revision)
        return LTXAdapter(
            LTXFlow(self.flow_shift()),
            transformer=role_config(self.cfg, role, rc.subfolder),
            vae=role_config(self.cfg, role, "vae"),
            latents_mean=mean,
            latents_std=std,
        )

    def decode(self, vae, raw_latents: torch.Tensor) -> torch.Tensor:
        """As LTXPipeline decodes at its default ``decode_timestep`` 0 (timestep-conditioned VAEs, 0.9.1+: no
        decode noise, ``temb`` 0)."""
        z = raw_latents.to(vae.dtype)
        temb = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device) if vae.config.timestep_conditioning else None
        return vae.decode(z, temb, return_dict=False)[0]

    @classmethod
    def media_encoder(
        cls, source: str, *, dtype: torch.dtype, device: torch.device, revision: str | None = None
    ) -> LTXEncoder:
        return LTXEncoder(source, dtype=dtype, device=device, revision=revision)

    # zero-padded real tokens and the latent shape of the family's encoder, exactly as Wan's
    encode_prompts = WanFamily.encode_prompts
    latent_shape = WanFamily.latent_shape
