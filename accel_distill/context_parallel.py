"""Context parallelism: diffusers' own Ulysses / ring attention on a (data x context) device mesh.

``training.context_parallel_size: C`` splits the N processes into N / C data-parallel groups of
C consecutive ranks. The C ranks of a group read the same samples and draw the same noise
(the data stream splits by data-parallel rank only; per-sample noise is keyed by the sample);
each role's transformer splits its video tokens over the group through diffusers'
``enable_parallelism(ContextParallelConfig(..., mesh=...))`` and the model's own ``_cp_plan``:
inputs are split at the first block, attention runs as Ulysses all-to-all or ring, the output is
gathered, so every rank of a group holds the same full prediction and computes the same loss.

Gradients: diffusers' gather returns, in backward, the slice of the (identical) output gradient
that the rank's own tokens produced, so a rank's parameter gradients are the part of the
gradient its tokens contribute; the group's sum is the full gradient. DDP and FSDP2 (which
shards over all N ranks, as accelerate's ``dp_shard_cp`` does) average over N = D x C, so the
gradients of every context-parallel module are multiplied by C after backward
(:func:`scale_partial_gradients`). Networks outside the split (a method's head on gathered
outputs) see identical inputs on every rank and are left alone; inner features a method taps are
gathered the same way as the output (:func:`gather_tokens`). Measured: tests/test_context_parallel.py.

Everything knowable from the config and the data's footers is checked before a model loads:
the world size, the model's plan, the attention backend, Ulysses' head count, the token count of
every latent shape (and of the text, where the plan splits it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from accel_distill.config.validate import fail
from accel_distill.errors import ConfigError

MODES = ("ulysses", "ring")
# Models whose diffusers plan exists but does not train correctly under it (diffusers 0.42: LTX's Ulysses
# shape error tried on 2 CPU processes; its ring behaviour read from attention_dispatch's TemplatedRingAttention).
BROKEN_PLANS = {
    "LTXVideoTransformer3DModel": (
        "its plan splits the text and its attention mask, but LTX's attention processor expands the mask to all "
        "heads (Ulysses holds a share of them: a shape error) and ring attention applies the local mask to every "
        "rotated key chunk"
    ),
}
# diffusers backends whose context-parallel forward cannot return the log-sum-exp ring attention merges
NO_LSE_BACKENDS = frozenset({"native", "_native_npu"})


@dataclass(frozen=True)
class Parallelism:
    """How the processes split: ``dp_size`` groups of ``cp_size`` consecutive ranks (context innermost)."""

    dp_size: int
    dp_rank: int
    cp_size: int = 1
    cp_rank: int = 0
    mode: str = "ulysses"
    mesh: Any = None  # torch DeviceMesh ("dp", "ring", "ulysses") when cp_size > 1

    @property
    def enabled(self) -> bool:
        return self.cp_size > 1


def plan_parallelism(acc, cfg) -> Parallelism:
    """The run's process layout; with context parallelism, the device mesh diffusers splits over (collective)."""
    t, n = cfg.training, acc.num_processes
    size = t.context_parallel_size
    if n % size:
        raise ConfigError(
            f"{cfg.source}: training.context_parallel_size: {size} does not divide the {n} launched processes"
        )
    if size == 1:
        return Parallelism(n, acc.process_index)
    from torch.distributed.device_mesh import init_device_mesh

    ring, ulysses = (size, 1) if t.context_parallel_mode == "ring" else (1, size)
    mesh = init_device_mesh(acc.device.type, (n // size, ring, ulysses), mesh_dim_names=("dp", "ring", "ulysses"))
    rank = acc.process_index
    return Parallelism(n // size, rank // size, size, rank % size, t.context_parallel_mode, mesh)


def enable_context_parallel(module: torch.nn.Module, par: Parallelism) -> None:
    """Split ``module``'s attention over ``par``'s context group with diffusers' CP hooks and its ``_cp_plan``."""
    from diffusers import ContextParallelConfig

    ring, ulysses = (par.cp_size, 1) if par.mode == "ring" else (1, par.cp_size)
    module.enable_parallelism(config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, mesh=par.mesh))


def cp_config_of(module: torch.nn.Module):
    """The diffusers ``ContextParallelConfig`` of a module under :func:`enable_context_parallel`
    (unwrapped from DDP), else None."""
    inner = getattr(module, "module", module)
    return getattr(getattr(inner, "_parallel_config", None), "context_parallel_config", None)


def context_parallel_degree(module: torch.nn.Module) -> int:
    """C of a module under :func:`enable_context_parallel`, else 1."""
    config = cp_config_of(module)
    return 1 if config is None else config.ring_degree * config.ulysses_degree


def scale_partial_gradients(modules) -> None:
    """Multiply the (N-averaged) gradients of context-parallel modules by C: the group's sum, averaged over data."""
    for module in modules:
        factor = context_parallel_degree(module)
        if factor > 1:
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, float(factor))


# --- config-time checks ----------------------------------------------------------------------
def role_transformer_configs(cfg, role: str) -> list[dict]:
    """The config of each transformer ``role`` loads (its subfolder, or both experts), without weights."""
    from accel_distill.families.wan import role_config
    from accel_distill.registry import FAMILIES

    keys = FAMILIES[cfg.recipe.family].module_keys(cfg, role)
    subfolders = [cfg.roles[role].subfolder] if len(keys) == 1 else keys
    return [role_config(cfg, role, sub) for sub in subfolders]


def cp_plan_of(config: dict) -> dict | None:
    """The diffusers ``_cp_plan`` of the model class a transformer config names (None: no plan)."""
    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name")), None)
    return getattr(cls, "_cp_plan", None)


def split_inputs(plan: dict) -> set[str]:
    """Names of the forward inputs a plan splits over the sequence (e.g. hidden_states, encoder_hidden_states)."""
    return {name for spec in plan.values() if isinstance(spec, dict) for name in spec if isinstance(name, str)}


def video_tokens(config: dict, latent_shape) -> int:
    """Tokens after patchify of one latent ``[C, T, H, W]`` for a transformer config (Wan, LTX layouts)."""
    p = config.get("patch_size") or 1
    patch = tuple(p) if isinstance(p, (list, tuple)) else (config.get("patch_size_t") or 1, p, p)
    _, t, h, w = latent_shape
    return (t // patch[0]) * (h // patch[1]) * (w // patch[2])


def validate_context_parallel(cfg) -> None:
    """Config-time checks of ``training.context_parallel_*`` (before any weights load)."""
    t, src = cfg.training, cfg.source
    size = t.context_parallel_size
    if size < 1:
        fail(src, "training.context_parallel_size", f"must be >= 1, got {size}")
    if t.context_parallel_mode not in MODES:
        fail(src, "training.context_parallel_mode", f"unknown mode {t.context_parallel_mode!r}; one of {MODES}")
    if size == 1:
        return
    for role in cfg.roles:
        for config in role_transformer_configs(cfg, role):
            name = config.get("_class_name")
            if cp_plan_of(config) is None:
                fail(
                    src,
                    "training.context_parallel_size",
                    f"family {cfg.recipe.family!r} ({name}, roles.{role}) has no context-parallel plan in "
                    "diffusers (_cp_plan); use context_parallel_size 1",
                )
            if name in BROKEN_PLANS:
                fail(
                    src,
                    "training.context_parallel_size",
                    f"family {cfg.recipe.family!r} ({name}) cannot train with diffusers' context parallelism: "
                    f"{BROKEN_PLANS[name]}; use context_parallel_size 1",
                )
            heads = config.get("num_attention_heads")
            if t.context_parallel_mode == "ulysses" and heads is not None and heads % size:
                fail(
                    src,
                    "training.context_parallel_size",
                    f"Ulysses splits attention heads: {size} does not divide the {heads} heads of roles.{role} "
                    f"({name}); use a divisor of {heads} or context_parallel_mode ring",
                )
        backend = cfg.roles[role].attention_backend or t.attention_backend or default_attention_backend()
        key = f"roles.{role}.attention_backend" if cfg.roles[role].attention_backend else "training.attention_backend"
        if backend not in cp_backends():
            fail(
                src,
                key,
                f"attention backend {backend!r} has no context-parallel form in diffusers; with "
                f"context_parallel_size > 1 use one of {', '.join(sorted(cp_backends()))}",
            )
        if t.context_parallel_mode == "ring":
            if backend in NO_LSE_BACKENDS:
                fail(
                    src,
                    key,
                    f"ring attention merges partial results by their log-sum-exp, which backend {backend!r} does "
                    "not return; use flash, _native_cudnn, _native_flash or sage (GPU), or context_parallel_mode ulysses",
                )


def cp_backends() -> set[str]:
    """diffusers attention backends with a context-parallel (Ulysses / ring) implementation."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return set(_AttentionBackendRegistry._supports_context_parallel)


def gather_tokens(module: torch.nn.Module, hidden: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``hidden`` of a context-parallel module's inner layer (its rank's token slice) gathered to the whole
    sequence with diffusers' own autograd all-gather (backward keeps the rank's slice, like the model output);
    unchanged for a module without context parallelism."""
    config = cp_config_of(module)
    if config is None:
        return hidden
    from diffusers.hooks.context_parallel import EquipartitionSharder

    return EquipartitionSharder.unshard(hidden, dim, config._flattened_mesh)


def default_attention_backend() -> str:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return _AttentionBackendRegistry.get_active_backend()[0].value


def check_token_counts(cfg, latent_shapes, *, where: str) -> None:
    """Every latent shape (and the text length, where the plan splits text) divides into C equal token slices."""
    size = cfg.training.context_parallel_size
    if size == 1:
        return
    text = cfg.pipeline_config.text_max_length
    for role in cfg.roles:  # every role's model sees the same latents (patch sizes could differ)
        for config in role_transformer_configs(cfg, role):
            for shape in latent_shapes:
                tokens = None if shape is None else video_tokens(config, shape)
                if tokens is not None and tokens % size:
                    raise ConfigError(
                        f"{cfg.source}: training.context_parallel_size: latents of shape {list(shape)} ({where}) "
                        f"are {tokens} tokens after roles.{role}'s patchify, which {size} ranks cannot split evenly"
                    )
            if "encoder_hidden_states" in split_inputs(cp_plan_of(config)) and text % size:
                raise ConfigError(
                    f"{cfg.source}: pipeline_config.text_max_length: {config.get('_class_name')} splits the text "
                    f"over the context-parallel ranks: {text} tokens do not divide by "
                    f"training.context_parallel_size {size}"
                )
