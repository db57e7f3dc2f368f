"""What every model family provides: role loading and an adapter of primitives.

A family knows how to load its diffusers components and how to call them; it
knows nothing about algorithms or the training loop. The adapter turns a
loaded role into the primitives methods consume (noise, predictions, CFG,
conversions), so a method never touches a model's call signature.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

import torch

from accel_distill.config.schema import RoleConfig, RunConfig
from accel_distill.context_parallel import gather_tokens
from accel_distill.errors import ConfigError
from accel_distill.export import LoraAdapters, LoraFile
from accel_distill.noise import NoiseSchedule
from accel_distill.roles import RoleHandle

Conditioning = dict[str, torch.Tensor]  # the family's keys, every value batch-first


def cond_batch_size(cond: Conditioning) -> int:
    return next(iter(cond.values())).shape[0]


def cond_cat(a: Conditioning, b: Conditioning) -> Conditioning:
    """Two conditionings as one batch (CFG: conditional and negative halves in one forward)."""
    return {k: torch.cat([a[k], b[k]]) for k in a}


def cond_index(cond: Conditioning, index: torch.Tensor) -> Conditioning:
    return {k: v.index_select(0, index) for k, v in cond.items()}


def cond_where(mask: torch.Tensor, a: Conditioning, b: Conditioning) -> Conditioning:
    """Per sample ``a`` where ``mask`` [B] is true, else ``b`` (e.g. CFG dropout)."""
    out = {}
    for k in a:
        m = mask.view(-1, *([1] * (a[k].dim() - 1)))
        out[k] = torch.where(m, a[k], b[k]) if a[k] is not b[k] else a[k]
    return out


class ModelAdapter(ABC):
    """A family's network call as the primitives methods consume, over a :class:`NoiseSchedule`.

    The family defines the conditioning dict (:meth:`conditioning`, :meth:`negative`) and the
    call (:meth:`_forward`); routing a role's forward to its experts by timestep lives here,
    once, for every family and method.
    """

    capabilities: frozenset[str] = frozenset({"native_prediction", "x0_prediction", "cfg"})

    def __init__(self, noise: NoiseSchedule, latent_channels: int, *, boundary_timestep: float | None = None):
        self.noise = noise
        self.latent_channels = latent_channels
        # two-expert roles: t >= boundary -> "transformer" (high noise), below -> "transformer_2"
        self.boundary_timestep = boundary_timestep
        # Sharded / replicated experts must run the same forwards (and backwards) on every rank:
        # an expert no local sample needs still runs on one sample, its output weighted by 0.
        self.lockstep = False

    # --- conditioning ---------------------------------------------------------------
    def conditioning(self, batch: dict) -> Conditioning:
        """The model's conditioning from a collated batch (text embeddings by default)."""
        return {"text": batch["text_embeds"]}

    def negative(self, cond: Conditioning, neg_text: torch.Tensor) -> Conditioning:
        """The unconditional variant of ``cond``: the negative-prompt embedding, the rest kept."""
        text = cond["text"]
        return {**cond, "text": neg_text.to(text.dtype).unsqueeze(0).expand(text.shape[0], *neg_text.shape)}

    # --- model calls ----------------------------------------------------------------
    @abstractmethod
    def _forward(self, module: torch.nn.Module, dtype: torch.dtype, x_t, t, cond: Conditioning) -> torch.Tensor:
        """Call one network; returns its native prediction."""

    def experts(self, role: RoleHandle, t: torch.Tensor) -> list[tuple[str, torch.Tensor | None]]:
        """(module key, per-sample mask or None for all) of the role's experts at timesteps ``t``."""
        if len(role.modules) == 1:
            return [(next(iter(role.modules)), None)]
        if self.boundary_timestep is None or set(role.modules) != {"transformer", "transformer_2"}:
            raise ValueError(f"role {role.name!r} has modules {sorted(role.modules)} but no timestep routing")
        high = t >= self.boundary_timestep
        return [("transformer", high), ("transformer_2", ~high)]

    def _routed(self, role: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, call) -> list:
        """``call(module, x_t, t, cond) -> [tensor, ...]`` (batch-first) run on the expert each sample's timestep
        selects, the outputs reassembled in batch order, in float32."""
        routes = self.experts(role, t)
        if len(routes) == 1:
            return [o.float() for o in call(role.modules[routes[0][0]], x_t, t, cond)]
        outs, zero = None, None
        for key, mask in routes:
            index = mask.nonzero().squeeze(1)  # one host sync per routed call (two-expert roles only)
            if index.numel() > 0:
                parts = call(role.modules[key], x_t[index], t[index], cond_index(cond, index))
                if outs is None:
                    outs = [p.new_empty((x_t.shape[0], *p.shape[1:]), dtype=torch.float32) for p in parts]
                for o, p in zip(outs, parts):
                    o.index_copy_(0, index, p.float())
            elif self.lockstep:  # keep collectives aligned: one sample, contributing 0
                first = torch.zeros(1, dtype=torch.long, device=x_t.device)
                parts = call(role.modules[key], x_t[:1], t[:1], cond_index(cond, first))
                z = sum(0.0 * p.float().sum() for p in parts)
                zero = z if zero is None else zero + z
        return outs if zero is None else [o + zero for o in outs]

    def predict(self, role: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The role's native prediction in float32, each sample from the expert its timestep selects."""
        return self._routed(role, x_t, t, cond, lambda m, x, tt, c: [self._forward(m, role.dtype, x, tt, c)])[0]

    def predict_x0(self, role: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.noise.to_x0(self.predict(role, x_t, t, cond), x_t, t)

    def predict_cfg(
        self,
        role: RoleHandle,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: Conditioning,
        neg: Conditioning | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """Classifier-free guidance: p = p_neg + g (p_cond - p_neg), diffusers' convention.

        g = 1 is the plain conditional prediction (one pass); otherwise the
        conditional and negative halves run as one batch of 2B.
        """
        if guidance_scale == 1.0:
            return self.predict(role, x_t, t, cond)
        p = self.predict(role, torch.cat([x_t, x_t]), torch.cat([t, t]), cond_cat(cond, neg))
        p_cond, p_neg = p.chunk(2)
        return p_neg + guidance_scale * (p_cond - p_neg)

    def predict_x0_cfg(self, role, x_t, t, cond, neg, guidance_scale: float) -> torch.Tensor:
        return self.noise.to_x0(self.predict_cfg(role, x_t, t, cond, neg, guidance_scale), x_t, t)

    # --- feature tap ----------------------------------------------------------------
    def feature_blocks(self, module: torch.nn.Module) -> torch.nn.ModuleList:
        """The network's repeated transformer blocks, in order (diffusers names them ``blocks`` or
        ``transformer_blocks``); :meth:`features` taps their outputs."""
        for name in ("blocks", "transformer_blocks"):
            blocks = getattr(module, name, None)
            if isinstance(blocks, torch.nn.ModuleList):
                return blocks
        raise ValueError(f"{type(module).__name__} has no transformer blocks to tap (blocks / transformer_blocks)")

    def feature_width(self, module: torch.nn.Module) -> int:
        """The width of the hidden states :meth:`features` returns (diffusers: heads x head dim)."""
        c = module.config
        return int(c.num_attention_heads * c.attention_head_dim)

    def features(
        self, role: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, blocks: Sequence[int]
    ) -> list[torch.Tensor]:
        """The hidden states ``[B, tokens, width]`` (float32) after each of ``blocks`` (0-based) in one forward
        of the role's network at ``(x_t, t, cond)``; gradients flow through them to ``x_t``.

        Forward hooks on the blocks, removed right after the forward (a gradient-checkpointed block's
        recomputation in backward never reaches them); the whole network runs, and with gradients its
        output joins the first tap with weight 0: a sharded (FSDP2) network unshards its root weights
        for backward from a hook on that output, and the layers before the first block need them.
        """

        def call(module, x, tt, c):
            found: dict[int, torch.Tensor] = {}
            layers = self.feature_blocks(module)

            def keep(i, _module, _args, out):
                found.setdefault(i, out[0] if isinstance(out, tuple) else out)

            hooks = [layers[i].register_forward_hook(functools.partial(keep, i)) for i in set(blocks)]
            try:
                out = self._forward(module, role.dtype, x, tt, c)
            finally:
                for h in hooks:
                    h.remove()
            # context parallelism: each rank tapped its own tokens; the whole sequence, as the output is
            taps = [gather_tokens(module, found[i]) for i in blocks]
            if out.requires_grad:  # FSDP2 re-gathers the root's weights from a hook on its output: keep it in the graph
                taps[0] = taps[0] + 0.0 * out.float().sum()
            return taps

        return self._routed(role, x_t, t, cond, call)

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

    def encode_conditioning(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 frames ``[B, F, H, W, 3]`` -> the family's per-row conditioning tensors ``{name: [B, ...]}``
        besides the latent (the columns its ``extra_tensor_columns`` reads; ``{}`` for text-to-video), on CPU."""

    def encode_text(self, prompts: Sequence[str], max_length: int) -> list[torch.Tensor]:
        """One ``[L_i, D]`` embedding per prompt (real tokens, at least one row), on CPU."""


class Family(ABC):
    """Loads one model family's roles, builds its adapter and owns its stock pipeline. Subclass and register.

    What export and validation need of a family is here, so they name none: the VAE and how
    it decodes, the export's ``model_index.json`` keys. (The pipeline class comes from the
    source's ``model_index.json``.)
    """

    name: str = ""
    noise_class: type[NoiseSchedule]
    vae_class: str = ""  # diffusers class of the family's VAE

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        """Family-specific checks on the config, before any weights load."""
        return None

    # What its adapter provides to methods (a method's required_capabilities must be a subset).
    capabilities: frozenset[str] = frozenset({"native_prediction", "x0_prediction", "cfg"})

    @classmethod
    def module_keys(cls, cfg: RunConfig, role: str) -> list[str]:
        """The modules role ``role`` loads (e.g. ``["transformer", "transformer_2"]``), from the config alone."""
        return ["transformer"]

    @classmethod
    def few_step_schedule(cls, cfg: RunConfig, steps, *, key: str, tolerance: float, kind: str):
        """The stock scheduler config that samples exactly ``steps`` (the family's noise schedule fits it).

        A family whose fit depends on the model (a DDPM schedule's stock config carries the betas of the
        model's own scheduler config) reads it from ``cfg``'s roles.
        """
        return cls.noise_class.fit_few_step(steps, key=key, tolerance=tolerance, kind=kind)

    @classmethod
    def feature_block_count(cls, cfg: RunConfig, role: str) -> int | None:
        """How many transformer blocks ``role``'s network has (the feature tap's range), from the config alone;
        None when only the loaded model can tell (then it is checked at load time)."""
        return None

    @classmethod
    def extra_tensor_columns(cls, cfg: RunConfig) -> tuple[str, ...]:
        """Per-row conditioning tensors the data must carry besides latents and text (e.g. image embeddings)."""
        return ()

    @abstractmethod
    def load_module(
        self, role: str, rc: RoleConfig, dtype: torch.dtype, *, empty: bool = False
    ) -> dict[str, torch.nn.Module]:
        """Load the role's modules, e.g. ``{"transformer": ...}``; ``empty``: meta weights, real buffers."""

    @abstractmethod
    def make_adapter(self, role: str) -> ModelAdapter:
        """The adapter for ``role``'s model (noise schedule, latent normalisation, channels, expert routing)."""

    # --- the stock pipeline -----------------------------------------------------------
    def export_index_updates(self, modules: dict[str, torch.nn.Module], index: dict) -> dict:
        """Keys of the source's ``model_index.json`` the export changes besides the trained modules."""
        return {}

    def extra_lora_files(self, adapters: LoraAdapters) -> dict[str, LoraFile]:
        """LoRA files the export writes besides diffusers' (``{file name: LoraFile}``), e.g. the
        key layout other loaders of this family read; ``adapters``: each exported module's adapter."""
        return {}

    def load_vae(self, source: str):
        """The VAE of ``source`` (fp32, eval), for validation decoding."""
        import diffusers

        return getattr(diffusers, self.vae_class).from_pretrained(source, subfolder="vae").eval().requires_grad_(False)

    def decode(self, vae, raw_latents: torch.Tensor) -> torch.Tensor:
        """Un-normalised latents ``[1, C, T, H, W]`` -> a video ``[1, 3, F, H, W]`` in [-1, 1]."""
        return vae.decode(raw_latents.to(vae.dtype), return_dict=False)[0]

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
