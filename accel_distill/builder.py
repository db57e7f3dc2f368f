"""Compose a run from a validated config: accelerator, roles, optimizers, data, method.

Only composition lives here: the family loads models, the method defines the
algorithm, accelerate wraps each trainable role (one ``prepare`` call per role,
as FSDP2 requires); frozen roles never enter ``prepare`` or ``save_state``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler

from accel_distill.checkpoint import save_adapters_only
from accel_distill.config.schema import RunConfig
from accel_distill.context_parallel import Parallelism, check_token_counts, enable_context_parallel, plan_parallelism
from accel_distill.data import LatentStream
from accel_distill.distributed import disable_accelerate_rank0_loading, fsdp_shard, is_fsdp, own_wrap_classes
from accel_distill.errors import ConfigError, UserError
from accel_distill.families.base import Family, ModelAdapter
from accel_distill.methods.base import DistillMethod
from accel_distill.precision import dtype_of, has_accelerator
from accel_distill.prompts import encode_cached, load_embedding_file
from accel_distill.registry import FAMILIES, METHODS
from accel_distill.roles import ModelBundle, RoleHandle, apply_trainable, attach_lora, unit_name


def role_dtype(cfg: RunConfig, role: str) -> torch.dtype:
    """Explicit ``precision``; else fp32 master weights if trainable, the mixed dtype if frozen."""
    rc = cfg.roles[role]
    if rc.precision is not None:
        return dtype_of(rc.precision)
    full_training = rc.trainable and rc.lora is None  # a LoRA base is frozen; its adapter is fp32
    return torch.float32 if full_training else dtype_of(cfg.training.mixed_precision)


def cache_lomo_check() -> None:
    """Ask importlib once whether ``lomo_optim`` is installed: accelerate's ``AcceleratedOptimizer.step`` asks it
    twice per step (accelerate 1.15, ``is_lomo_available``: ~30 us each on a CPU, uncached), and the installed
    packages do not change during a run."""
    import accelerate.optimizer

    check = accelerate.optimizer.is_lomo_available
    if not hasattr(check, "cache_info"):
        accelerate.optimizer.is_lomo_available = functools.cache(check)


def make_accelerator(cfg: RunConfig) -> Accelerator:
    t = cfg.training
    cache_lomo_check()
    acc = Accelerator(
        mixed_precision=t.mixed_precision,  # resolved against the launcher's by the config loader
        log_with=list(t.trackers) or None,
        project_config=ProjectConfiguration(project_dir=t.output_dir, logging_dir=os.path.join(t.output_dir, "logs")),
        # No accelerator at all: say so, or a CPU host's multi-process launch starts single processes.
        cpu=not has_accelerator(),
    )
    if t.allow_tf32 and acc.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if t.num_gpus is not None and t.num_gpus != acc.num_processes:
        raise ConfigError(
            f"{cfg.source}: training.num_gpus: is {t.num_gpus} but {acc.num_processes} processes were launched; "
            "change num_gpus or the launch command (accelerate --num_processes)"
        )
    if t.mixed_precision == "fp16" and acc.scaler is None:
        raise ConfigError(
            f"{cfg.source}: training.mixed_precision: fp16 needs a gradient scaler, which accelerate gives only on "
            f"an accelerator (this run is on {acc.device.type}, where fp16 would silently train in fp32); use bf16"
        )
    set_seed(t.seed, device_specific=True)
    return acc


def apply_speed_switches(cfg: RunConfig, role: str, module: torch.nn.Module) -> None:
    """The role's attention backend and regional compile (before sharding / prepare, after LoRA)."""
    rc, t = cfg.roles[role], cfg.training
    backend = rc.attention_backend or t.attention_backend
    if backend is not None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

        default = registry._active_backend  # set_attention_backend also makes it every other model's default
        try:
            module.set_attention_backend(backend)
        except (RuntimeError, ValueError, ImportError) as e:
            raise ConfigError(
                f"{cfg.source}: roles.{role}.attention_backend: {backend!r} cannot be set ({str(e).splitlines()[0]})"
            ) from None
        finally:  # this module's processors hold their backend; roles left unset keep diffusers' default
            registry.set_active_backend(default)
    if rc.compile if rc.compile is not None else t.compile:
        module.compile_repeated_blocks()


def load_bundle(
    cfg: RunConfig, family: Family, method_cls: type[DistillMethod], acc: Accelerator, par: Parallelism | None = None
) -> ModelBundle:
    """Load every role; give trainable ones an AdamW + LR schedule and wrap them with accelerate."""
    bundle = ModelBundle()
    fsdp = is_fsdp(acc)
    if fsdp:
        disable_accelerate_rank0_loading(acc)
    for name, rc in cfg.roles.items():
        dtype = role_dtype(cfg, name)
        from_rank0 = fsdp and not rc.trainable and rc.rank0_loading
        loaded = family.load_module(name, rc, dtype, empty=from_rank0 and not acc.is_main_process)
        if rc.lora is not None:
            check_lora_targets(cfg, name, loaded)
            modules = {k: attach_lora(m, rc.lora) for k, m in loaded.items()}
        else:
            modules = {k: apply_trainable(m, rc.trainable) for k, m in loaded.items()}
        for m in modules.values():
            apply_speed_switches(cfg, name, m)
            if par is not None and par.enabled:  # after the attention backend, before sharding / prepare
                enable_context_parallel(m, par)
        if fsdp and not rc.trainable:  # sharded like a prepared role, but outside prepare/save_state
            modules = {k: fsdp_shard(acc, m, from_rank0=from_rank0) for k, m in modules.items()}
        o = cfg.role_defaults(name)
        handle = RoleHandle(
            name, modules, rc.trainable, dtype, max_grad_norm=o["max_grad_norm"], source=rc.path, lora=rc.lora
        )
        if rc.trainable:  # one prepare, optimizer and LR schedule per module (FSDP2: one model per prepare)
            for key, module in modules.items():
                module, handle.optimizers[key], handle.lr_schedulers[key] = prepare_trainable(
                    acc, module, o, method_cls.optimizer_steps(cfg, name)
                )
                handle.modules[key] = module
                if rc.lora is not None and not fsdp:
                    save_adapters_only(acc, [module])
        elif not fsdp:  # replicated, never wrapped (DDP refuses modules without gradients)
            for m in modules.values():
                m.to(acc.device)
        bundle.roles[name] = handle
    return bundle


def check_lora_targets(cfg: RunConfig, role: str, modules: dict[str, torch.nn.Module]) -> None:
    """Every LoRA target names a layer of every module (peft only refuses when none matches at all)."""
    for key, module in modules.items():
        names = [n for n, _ in module.named_modules()]
        for target in cfg.roles[role].lora.target_modules:
            if not any(n == target or n.endswith("." + target) for n in names):
                raise ConfigError(
                    f"{cfg.source}: roles.{role}.lora.target_modules: {target!r} matches no layer of the role's "
                    f"{key} ({type(module).__name__})"
                )


def prepare_trainable(acc: Accelerator, module: torch.nn.Module, o: dict, steps: int):
    """(prepared module, prepared AdamW, LR scheduler stepping ``steps`` times) of one trainable module."""
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad],
        lr=o["learning_rate"],
        betas=tuple(o["betas"]),
        weight_decay=o["weight_decay"],
        eps=o["adam_epsilon"],
    )
    # Not prepared: accelerate would step a prepared scheduler once per process.
    scheduler = get_scheduler(
        o["lr_scheduler"], optimizer, num_warmup_steps=o["lr_warmup_steps"], num_training_steps=steps
    )
    module, optimizer = acc.prepare(module, optimizer)
    acc.register_for_checkpointing(scheduler)
    return module, optimizer, scheduler


def add_auxiliary(cfg: RunConfig, method: DistillMethod, acc: Accelerator) -> None:
    """The method's own networks become trainable roles: prepared, optimised and checkpointed like any."""
    built = method.build_auxiliary()
    wanted = tuple(type(method).auxiliary_names(cfg))
    if tuple(built) != wanted:
        raise ValueError(f"method {method.name!r} built auxiliary networks {list(built)} but declared {list(wanted)}")
    for name, module in built.items():
        o = type(method).auxiliary_settings(cfg, name)
        module = apply_trainable(module.to(acc.device), True)
        handle = RoleHandle(name, {name: module}, True, torch.float32, max_grad_norm=o["max_grad_norm"])
        with own_wrap_classes(acc, module):  # the plugin's block class (WanTransformerBlock) is not in it
            module, handle.optimizers[name], handle.lr_schedulers[name] = prepare_trainable(
                acc, module, o, type(method).optimizer_steps(cfg, name)
            )
        handle.modules[name] = module
        method.bundle.roles[name] = handle


def checkpoint_roles(cfg: RunConfig) -> dict:
    """Which trainable unit (a role, or ``role.module`` for several) each of accelerate's numbered
    model/optimizer/scheduler files holds, in prepare order."""
    family_cls = FAMILIES[cfg.recipe.family]
    names = []
    for name, rc in cfg.roles.items():
        if rc.trainable:
            keys = family_cls.module_keys(cfg, name)
            names += [unit_name(name, k, keys) for k in keys]
    names += list(METHODS[cfg.recipe.method].auxiliary_names(cfg))
    return {"models": names, "optimizers": names, "schedulers": names}


def load_negative(cfg: RunConfig, family: Family, acc: Accelerator) -> torch.Tensor:
    """The unconditional embedding [text_max_length, D]: a given file, or encoded once and cached."""
    p = cfg.pipeline_config
    if p.negative_prompt_embeds is not None:

        def bad(message: str) -> NoReturn:
            raise ConfigError(f"{cfg.source}: pipeline_config.negative_prompt_embeds: {message}")

        return load_embedding_file(p.negative_prompt_embeds, p.text_max_length, bad)
    cache = Path(cfg.training.output_dir) / "negative_prompt_embeds.safetensors"
    source = cfg.roles[METHODS[cfg.recipe.method].product_role].path
    return encode_cached(family, source, [p.negative_prompt], p.text_max_length, acc, cache)[0]


def make_stream(
    cfg: RunConfig,
    method_cls: type[DistillMethod],
    adapter: ModelAdapter,
    acc: Accelerator,
    par: Parallelism | None = None,
):
    t = cfg.training
    par = par or Parallelism(acc.num_processes, acc.process_index)
    return LatentStream(
        t.data_path,
        batch_size=t.train_batch_size,
        seed=t.seed,
        shuffle=t.shuffle,
        # split by data-parallel rank: the ranks of a context-parallel group read the same samples
        rank=par.dp_rank,
        world_size=par.dp_size,
        text_max_length=cfg.pipeline_config.text_max_length,
        require_latents=method_cls.needs_latents(cfg),
        expected_latent_channels=adapter.latent_channels,
        # the text encoder width the transformer takes; an adapter without it skips the check
        expected_text_dim=getattr(adapter, "text_dim", None),
        # the family's conditioning tensors besides text (first-frame latents, image embeddings, ...) and the
        # method's own (teacher trajectories, ...), each saying what reads it (for a missing column's message)
        extra_tensor_columns={
            **{
                c: f"family {cfg.recipe.family!r} reads {c!r}"
                for c in FAMILIES[cfg.recipe.family].extra_tensor_columns(cfg)
            },
            **method_cls.extra_tensor_columns(cfg),
        },
        # NaN/inf: the trainer tests each batch on the device within its one sync per iteration and
        # names the file and row from the batch's row_sources (data/finite.py); no second host read
        check_finite=False,
        prefetch=t.dataloader_num_workers,
        pin_memory=acc.device.type not in ("cpu", "mps"),  # MPS shares host memory: nothing to pin
    )


@dataclass
class Runtime:
    """Everything a run needs, built and wired."""

    accelerator: Accelerator
    family: Family
    bundle: ModelBundle
    adapter: ModelAdapter
    method: DistillMethod
    stream: LatentStream
    parallel: Parallelism | None = None  # the process layout (data x context parallel)


def build_runtime(cfg: RunConfig) -> Runtime:
    acc = make_accelerator(cfg)
    family = FAMILIES[cfg.recipe.family](cfg)
    method_cls = METHODS[cfg.recipe.method]
    student_source = cfg.roles[method_cls.product_role].path
    adapter = family.make_adapter(method_cls.product_role)
    adapter.lockstep = acc.num_processes > 1  # every rank runs every expert: collectives stay aligned
    par = plan_parallelism(acc, cfg)
    stream = make_stream(cfg, method_cls, adapter, acc, par)
    p = cfg.pipeline_config
    latent_shape = None
    if None not in (p.num_frames, p.height, p.width):
        latent_shape = family.latent_shape(student_source, p.num_frames, p.height, p.width)
        check_token_counts(cfg, [latent_shape], where="pipeline_config.num_frames/height/width")
    elif not stream.has_latents and not method_cls.needs_latents(cfg):
        raise UserError(
            f"{cfg.source}: pipeline_config.num_frames/height/width: needed for data-free rollouts "
            f"because {cfg.training.data_path} holds text only"
        )
    check_token_counts(cfg, stream.buckets, where=f"in {cfg.training.data_path}")  # before any model loads
    neg = load_negative(cfg, family, acc) if method_cls.needs_negative_conditioning(cfg) else None
    bundle = load_bundle(cfg, family, method_cls, acc, par)
    method = method_cls(bundle, adapter, cfg, device=acc.device, neg_cond=neg)
    add_auxiliary(cfg, method, acc)
    method.latent_shape = latent_shape
    return Runtime(acc, family, bundle, adapter, method, stream, par)


def describe_plan(cfg: RunConfig) -> list[str]:
    """Human-readable plan for ``--dry-run``: roles, which train, with which optimizer."""
    method_cls = METHODS[cfg.recipe.method]
    t = cfg.training
    lines = [f"recipe: family={cfg.recipe.family} method={cfg.recipe.method}", "roles:"]
    family_cls = FAMILIES[cfg.recipe.family]
    for name, rc in cfg.roles.items():
        dtype = str(role_dtype(cfg, name)).replace("torch.", "")
        keys = family_cls.module_keys(cfg, name)
        where = rc.subfolder if len(keys) == 1 else " + ".join(keys)  # two experts: each its own optimizer
        if rc.trainable:
            o = cfg.role_defaults(name)
            lines.append(
                f"  {name}: {rc.path} [{where}] trainable, {dtype} weights, AdamW lr={o['learning_rate']:g} "
                f"betas={tuple(o['betas'])} weight_decay={o['weight_decay']:g}, {o['lr_scheduler']} schedule "
                f"(warmup {o['lr_warmup_steps']}) over {method_cls.optimizer_steps(cfg, name)} optimizer steps, "
                f"grad clip {o['max_grad_norm']}"
            )
        else:
            lines.append(f"  {name}: {rc.path} [{where}] frozen, {dtype} weights, no optimizer")
    lines.append(
        f"training: {t.max_train_steps} iterations, batch {t.train_batch_size} per process x "
        f"{t.gradient_accumulation_steps} accumulation, mixed precision {t.mixed_precision}, seed {t.seed}"
    )
    lines.append(
        f"data: {t.data_path} (shuffle={t.shuffle}, latents {'required' if method_cls.needs_latents(cfg) else 'optional'})"
    )
    if t.context_parallel_size > 1:
        lines.append(
            f"context parallel: {t.context_parallel_mode} attention over groups of {t.context_parallel_size} ranks "
            "(diffusers' _cp_plan); a group reads the same samples and draws the same noise"
        )
    lines.append(f"checkpoints: every {t.checkpointing_steps} iterations in {t.output_dir}/checkpoints")
    lines.extend(method_cls.describe(cfg))
    return lines
