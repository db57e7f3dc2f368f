"""Wan2.1, Wan2.2 TI2V-5B and Wan2.2 A14B (two experts), diffusers-native.

Roles load as ``WanTransformer3DModel.from_pretrained(path, subfolder="transformer")``
from a Hub id or a local folder. Training reads only the VAE *config* (its
``latents_mean`` / ``latents_std``) to normalise stored latents, never the VAE
weights; the text encoder is loaded once, on one process, only when a
negative prompt must be encoded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import lru_cache

import torch

from accel_distill.config.schema import RoleConfig, RunConfig
from accel_distill.config.validate import fail, looks_local
from accel_distill.errors import ConfigError
from accel_distill.export import LoraAdapters, LoraFile
from accel_distill.families.base import Family, ModelAdapter
from accel_distill.families.wan_encoder import WanEncoder, component_config
from accel_distill.families.wan_lora import LAYOUT, lora_file_names, to_original_wan, unnamed_targets
from accel_distill.noise import RectifiedFlow
from accel_distill.precision import half_dtype_for
from accel_distill.registry import METHODS, register_family


class WanAdapter(ModelAdapter):
    """Wan over rectified flow, with the VAE's per-channel latent normalisation.

    ``expand_timesteps`` (Wan2.2 TI2V-5B's ``model_index.json``): the transformer takes one timestep per
    latent token, ``t`` where :meth:`token_mask` is 1 and 0 where it is 0 (all ones for text-to-video), as
    the stock pipelines pass it; ``patch_size`` is the transformer's.
    """

    def __init__(
        self,
        noise: RectifiedFlow,
        latent_channels: int,
        latents_mean: list[float],
        latents_std: list[float],
        *,
        boundary_timestep: float | None = None,
        expand_timesteps: bool = False,
        patch_size: Sequence[int] = (1, 2, 2),
    ):
        super().__init__(noise, latent_channels, boundary_timestep=boundary_timestep)
        self.expand_timesteps = expand_timesteps
        self.patch_size = tuple(int(p) for p in patch_size)
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

    def _forward(self, module, dtype, x_t, t, cond) -> torch.Tensor:
        return module(**self.model_inputs(dtype, x_t, t, cond), return_dict=False)[0]

    def model_inputs(self, dtype: torch.dtype, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> dict:
        """The transformer's keyword arguments, built as the stock pipeline builds them."""
        return {
            "hidden_states": x_t.to(dtype),
            "timestep": self.model_timesteps(x_t, t),
            "encoder_hidden_states": cond["text"].to(dtype),
        }

    def model_timesteps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``t`` [B] (float32), or with ``expand_timesteps`` one per token ``[B, T * H/p * W/p]``."""
        t = t.to(torch.float32)
        if not self.expand_timesteps:
            return t
        _, ph, pw = self.patch_size
        mask = self.token_mask(x_t)[0, 0, :, ::ph, ::pw]  # WanPipeline: (mask[0][0][:, ::2, ::2] * t).flatten()
        return (mask * t.view(-1, 1, 1, 1)).flatten(1)

    def token_mask(self, x_t: torch.Tensor) -> torch.Tensor:
        """``[1, 1, T, H, W]`` float32: 1 where the latent is denoised (everywhere for text-to-video)."""
        return torch.ones((1, 1, *x_t.shape[2:]), dtype=torch.float32, device=x_t.device)


def role_source(rc: RoleConfig) -> str:
    """A role's model as ``from_pretrained`` takes it: a local folder (``~`` expanded) or a Hub id."""
    return os.path.expanduser(rc.path) if looks_local(rc.path) else rc.path


def role_config(cfg: RunConfig, role: str, subfolder: str) -> dict:
    """The config of one component of ``role``'s model; unreadable is a ConfigError naming the role."""
    try:
        return component_config(role_source(cfg.roles[role]), subfolder)
    except ConfigError as e:
        raise ConfigError(f"{cfg.source}: roles.{role}.path: {e}") from None


def role_transformer_config(cfg: RunConfig, role: str) -> dict:
    """The config of ``role``'s transformer (its ``subfolder``)."""
    return role_config(cfg, role, cfg.roles[role].subfolder)


def check_subfolder(cfg: RunConfig, role: str) -> None:
    """A local role's transformer subfolder must exist (one line naming the key)."""
    rc = cfg.roles[role]
    if looks_local(rc.path) and not os.path.isdir(os.path.join(role_source(rc), rc.subfolder)):
        fail(cfg.source, f"roles.{role}.subfolder", f"no folder {rc.subfolder!r} in {rc.path}")


@lru_cache(maxsize=16)
def model_index(path: str, revision: str | None = None) -> dict | None:
    """A pipeline's ``model_index.json``: a local folder's (None without one), or that one small
    file of a Hub id (which experts it has must be known before anything loads)."""
    if looks_local(path):
        index = os.path.join(os.path.expanduser(path), "model_index.json")
        if not os.path.exists(index):
            return None
        with open(index, encoding="utf-8") as f:
            return json.load(f)
    from huggingface_hub import hf_hub_download

    try:
        with open(hf_hub_download(path, "model_index.json", revision=revision), encoding="utf-8") as f:
            return json.load(f)
    except Exception as e:  # offline, unknown repo, no such file: say so, never guess the layout
        raise ConfigError(f"{path}: cannot read model_index.json from the Hub ({str(e).splitlines()[0]})") from None


def has_second_expert(index: dict | None) -> bool:
    return index is not None and (index.get("transformer_2") or [None])[0] is not None


@register_family("wan")
class WanFamily(Family):
    """Wan transformers: Wan2.1 1.3B/14B, Wan2.2 TI2V-5B, and Wan2.2 A14B's two experts.

    A two-expert model (``transformer_2`` in its ``model_index.json``) loads both experts
    for every role; a forward at ``t >= boundary_ratio * 1000`` runs ``transformer``
    (high noise), below it ``transformer_2`` (low noise), as ``WanPipeline`` samples.
    """

    noise_class = RectifiedFlow
    vae_class = "AutoencoderKLWan"
    adapter_class: type[WanAdapter] = WanAdapter

    @classmethod
    def module_keys(cls, cfg: RunConfig, role: str) -> list[str]:
        rc = cfg.roles[role]
        try:
            two = rc.subfolder == "transformer" and has_second_expert(model_index(rc.path, rc.revision))
        except ConfigError as e:
            raise ConfigError(f"{cfg.source}: roles.{role}.path: {e}") from None
        return ["transformer", "transformer_2"] if two else ["transformer"]

    @classmethod
    def feature_block_count(cls, cfg: RunConfig, role: str) -> int:
        return int(role_transformer_config(cfg, role)["num_layers"])

    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        experts = {}
        for role, rc in cfg.roles.items():
            check_subfolder(cfg, role)
            keys = cls.module_keys(cfg, role)
            cls.check_model(cfg, role, rc)
            experts[role] = len(keys)
            if len(keys) == 2:
                cls._check_experts(cfg, role, rc)
        if len(set(experts.values())) > 1:
            detail = ", ".join(f"{r}: {n}" for r, n in experts.items())
            fail(cfg.source, "roles", f"every role must have the same number of experts ({detail})")
        product = METHODS[cfg.recipe.method].product_role
        lora = cfg.roles[product].lora if product in cfg.roles else None
        for target, layer in unnamed_targets(lora.target_modules) if lora is not None else []:
            # the exported adapter is also written in the original-Wan layout, which has no name for it
            fail(
                cfg.source,
                f"roles.{product}.lora.target_modules",
                f"{target!r} selects {layer}, which has no original-Wan / ComfyUI LoRA name",
            )
        ratio = cfg.pipeline_config.boundary_ratio
        if ratio is not None and not 0.0 < ratio < 1.0:
            fail(cfg.source, "pipeline_config.boundary_ratio", f"must be in (0, 1), got {ratio}")
        if ratio is not None and max(experts.values(), default=1) == 1:
            fail(cfg.source, "pipeline_config.boundary_ratio", "set, but no role has two experts (transformer_2)")

    @classmethod
    def check_model(cls, cfg: RunConfig, role: str, rc: RoleConfig) -> None:
        """The role's model is one this family drives: here a text-to-video Wan (input channels = latent's)."""
        t = role_transformer_config(cfg, role)
        if t["in_channels"] != t["out_channels"]:
            fail(
                cfg.source,
                f"roles.{role}.path",
                f"{rc.path} is an image-to-video model ({t['in_channels']} input channels for a "
                f"{t['out_channels']}-channel latent): use recipe.family wan_i2v",
            )

    @classmethod
    def _check_experts(cls, cfg: RunConfig, role: str, rc: RoleConfig) -> None:
        """Both experts of a two-expert model: same architecture, a boundary in (0, 1), LoRA targets in both."""
        src = os.path.expanduser(rc.path)
        configs = [component_config(src, key) for key in ("transformer", "transformer_2")]
        shape = [{k: v for k, v in c.items() if not k.startswith("_")} for c in configs]
        if shape[0] != shape[1]:
            differ = sorted(k for k in set(shape[0]) | set(shape[1]) if shape[0].get(k) != shape[1].get(k))
            fail(cfg.source, f"roles.{role}.path", f"{rc.path}: transformer and transformer_2 differ in {differ}")
        ratio = cfg.pipeline_config.boundary_ratio
        if ratio is None:
            ratio = model_index(rc.path, rc.revision).get("boundary_ratio")
            if not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
                fail(
                    cfg.source,
                    f"roles.{role}.path",
                    f"{rc.path}/model_index.json: boundary_ratio must be in (0, 1) for two experts, got {ratio!r} "
                    "(or set pipeline_config.boundary_ratio)",
                )

    def load_module(
        self, role: str, rc: RoleConfig, dtype: torch.dtype, *, empty: bool = False
    ) -> dict[str, torch.nn.Module]:
        keys = self.module_keys(self.cfg, role)
        subfolders = [rc.subfolder] if len(keys) == 1 else keys
        return {key: self._load_one(role, rc, sub, dtype, empty) for key, sub in zip(keys, subfolders)}

    def _load_one(self, role: str, rc: RoleConfig, subfolder: str, dtype: torch.dtype, empty: bool):
        from diffusers import WanTransformer3DModel

        source = os.path.expanduser(rc.path) if looks_local(rc.path) else rc.path
        try:
            if empty:  # meta parameters, real buffers; weights arrive from rank 0
                from accelerate import init_empty_weights

                with init_empty_weights(include_buffers=False):
                    model = WanTransformer3DModel.from_config(component_config(source, subfolder)).to(dtype)
            else:
                model = WanTransformer3DModel.from_pretrained(
                    source, subfolder=subfolder, revision=rc.revision, dtype=dtype
                )
        except OSError as e:
            raise ConfigError(
                f"{self.cfg.source}: roles.{role}.path: cannot load a Wan transformer from {rc.path!r} "
                f"({str(e).splitlines()[0]})"
            ) from None
        if rc.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return model

    def flow_shift(self, source: str) -> float:
        """pipeline_config.flow_shift, else the shift in the source's scheduler config."""
        if self.cfg.pipeline_config.flow_shift is not None:
            return self.cfg.pipeline_config.flow_shift
        sched = component_config(source, "scheduler")
        return float(sched.get("flow_shift") or sched.get("shift") or 1.0)

    def boundary_ratio(self, source: str) -> float | None:
        """pipeline_config.boundary_ratio, else the model's ``model_index.json`` one (two-expert models)."""
        if self.cfg.pipeline_config.boundary_ratio is not None:
            return self.cfg.pipeline_config.boundary_ratio
        index = model_index(source)
        return index.get("boundary_ratio") if has_second_expert(index) else None

    def make_adapter(self, role: str) -> WanAdapter:
        adapter = self.adapter_class(**self.adapter_kwargs(role))
        # the text encoder width the transformer takes: the data's embeddings are checked against it
        adapter.text_dim = int(
            component_config(role_source(self.cfg.roles[role]), self.cfg.roles[role].subfolder)["text_dim"]
        )
        return adapter

    def adapter_kwargs(self, role: str) -> dict:
        """:attr:`adapter_class`'s arguments for ``role``'s model, from its configs (no weights)."""
        rc = self.cfg.roles[role]
        source = role_source(rc)
        vae = component_config(source, "vae")
        transformer = component_config(source, rc.subfolder)
        ratio = self.boundary_ratio(source)
        return dict(
            noise=RectifiedFlow(self.flow_shift(source)),
            latent_channels=int(transformer["out_channels"]),  # the latent's (I2V models take more input channels)
            latents_mean=vae["latents_mean"],
            latents_std=vae["latents_std"],
            boundary_timestep=None if ratio is None else ratio * RectifiedFlow.num_train_timesteps,
            expand_timesteps=bool((model_index(source) or {}).get("expand_timesteps")),
            patch_size=transformer.get("patch_size") or (1, 2, 2),
        )

    def export_index_updates(self, modules: dict[str, torch.nn.Module], index: dict) -> dict:
        if "transformer_2" in modules:  # both experts, and where the pipeline switches between them
            return {"boundary_ratio": self.boundary_ratio(self.cfg.roles[next(iter(self.cfg.roles))].path)}
        if "transformer_2" in index:  # a single-transformer student of a two-expert source
            return {"transformer_2": [None, None], "boundary_ratio": None}
        return {}

    def extra_lora_files(self, adapters: LoraAdapters) -> dict[str, LoraFile]:
        """The adapter(s) in the original-Wan / ComfyUI layout: ``wan_lora.safetensors``, or a
        high-noise (``transformer``) and a low-noise (``transformer_2``) file for two experts."""
        names = lora_file_names(list(adapters))
        return {
            names[k]: LoraFile(k, LAYOUT, to_original_wan(state, config)) for k, (state, config) in adapters.items()
        }

    @classmethod
    def media_encoder(
        cls, source: str, *, dtype: torch.dtype, device: torch.device, revision: str | None = None
    ) -> WanEncoder:
        return WanEncoder(source, dtype=dtype, device=device, revision=revision)

    def encode_prompts(self, source: str, prompts: list[str], max_length: int, device: torch.device) -> torch.Tensor:
        # UMT5-XXL is ~11 GB in bf16: half precision on accelerators, fp32 on CPU. Loaded once per call.
        embeds = self.media_encoder(source, dtype=half_dtype_for(device), device=device).encode_text(
            prompts, max_length
        )
        out = torch.zeros(len(embeds), max_length, embeds[0].shape[-1])  # zero padding, as WanPipeline's
        for i, e in enumerate(embeds):
            out[i, : e.shape[0]] = e.float()
        return out

    def latent_shape(self, source: str, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        return self.media_encoder(source, dtype=torch.float32, device=torch.device("cpu")).latent_shape(
            num_frames, height, width
        )
