"""One training run end to end: build, resume, train, checkpoint, export."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, is_dataclass
from pathlib import Path

from accelerate.logging import get_logger

from accel_distill.builder import Runtime, build_runtime, checkpoint_roles
from accel_distill.checkpoint import CheckpointManager, completed_checkpoints, find_resume_checkpoint
from accel_distill.config import RunConfig, resolved_dict
from accel_distill.distributed import gather_full_model
from accel_distill.ema import EMACallback
from accel_distill.export import export_lora, export_student, lora_adapters, source_index
from accel_distill.trainer import Callback, Trainer, TrainerState

logger = get_logger(__name__)


def flat_config(cfg: RunConfig) -> dict:
    """The resolved config as flat ``section.key`` scalars, for any tracker."""
    out = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk("", resolved_dict(cfg))
    return out


def start_trackers(cfg: RunConfig, rt: Runtime) -> None:
    t = cfg.training
    if not t.trackers:
        return
    init_kwargs = {"wandb": {"name": t.wandb_run_name}} if t.wandb_run_name else {}
    rt.accelerator.init_trackers(t.tracker_project_name, config=flat_config(cfg), init_kwargs=init_kwargs)


def build_callbacks(cfg: RunConfig, rt: Runtime) -> list[Callback]:
    """EMA for roles that ask for it; validation when enabled."""
    callbacks: list[Callback] = []
    specs = {role: rc.ema for role, rc in cfg.roles.items() if rc.ema is not None}
    ema = EMACallback(rt.bundle, specs) if specs else None
    rt.method.ema = ema  # reachable from the method (e.g. an EMA target network)
    if ema is not None:
        callbacks.append(ema)
    callbacks.extend(rt.method.build_callbacks())  # method-owned state (a consistency target's EMA, ...)
    if cfg.training.log_validation:
        from accel_distill.validation import ValidationCallback

        callbacks.append(ValidationCallback(cfg, rt, ema))
    return callbacks


def find_callback(callbacks: list[Callback], kind: type) -> Callback | None:
    return next((c for c in callbacks if isinstance(c, kind)), None)


def resume(rt: Runtime, ckpt: CheckpointManager, path: Path | None, callbacks: list[Callback]) -> TrainerState:
    """Restore everything a checkpoint holds; a fresh state when there is nothing to resume."""
    if path is None:
        return TrainerState()
    trainer_state, rank_state, shared = ckpt.load(path)
    rt.stream.load_state_dict(rank_state["data"])
    rt.method.load_state_dict(rank_state["method"])
    saved, saved_shared = rank_state.get("callbacks", {}), shared.get("callbacks", {})
    for callback in callbacks:
        if callback.name in saved or callback.name in saved_shared:
            callback.load_state_dict(saved.get(callback.name, {}))
            callback.load_shared_state_dict(saved_shared.get(callback.name, {}))
        else:
            logger.warning(f"{path} has no {callback.name} state; it starts fresh", main_process_only=True)
    logger.info(f"resumed from {path} at iteration {trainer_state['iteration']}", main_process_only=True)
    return TrainerState(**trainer_state)


def export(cfg: RunConfig, rt: Runtime, ema: EMACallback | None = None) -> Path:
    """Write the student alone as a diffusers folder (every rank calls: gathering can be collective).

    With an EMA whose spec says ``export``, the averaged weights are exported.
    """
    out = Path(cfg.training.export_dir or Path(cfg.training.output_dir) / "export")
    role = rt.method.export_role()
    acc = rt.accelerator
    use_ema = ema is not None and role.name in ema.specs and ema.specs[role.name].export
    with ema.averaged(role.name) if use_ema else contextlib.nullcontext():
        full = {k: gather_full_model(acc, m) for k, m in role.modules.items()}  # collective under FSDP
    if acc.is_main_process:
        # provenance: what the student was distilled with (guidance, steps, ...) travels with it
        method_config = asdict(cfg.method_config) if is_dataclass(cfg.method_config) else {}
        info = {"method": cfg.recipe.method, "method_config": method_config, "ema": use_ema}
        updates = rt.family.export_index_updates(full, source_index(role.source))
        schedule = rt.method.export_schedule()
        if role.lora is not None:
            merged = role.lora.export_merged
            extra = rt.family.extra_lora_files(lora_adapters(full))  # e.g. Wan's original / ComfyUI layout
            export_lora(
                full, role.source, out, schedule, merged=merged, index_updates=updates, info=info, extra_files=extra
            )
        else:
            export_student(full, role.source, out, schedule, index_updates=updates, info=info)
    acc.wait_for_everyone()
    return out


def train(cfg: RunConfig) -> Path:
    """Run the recipe in ``cfg``; returns the export folder."""
    roles = checkpoint_roles(cfg)
    resume_from = find_resume_checkpoint(cfg.training.output_dir, cfg.training.resume_from_checkpoint, roles)
    rt = build_runtime(cfg)
    acc = rt.accelerator
    start_trackers(cfg, rt)
    callbacks = build_callbacks(cfg, rt)
    ckpt = CheckpointManager(
        acc, cfg.training.output_dir, roles=roles, total_limit=cfg.training.checkpoints_total_limit
    )
    state = resume(rt, ckpt, resume_from, callbacks)
    if resume_from is None and completed_checkpoints(ckpt.root):
        logger.warning(
            f"{ckpt.root} holds checkpoints from an earlier run; starting from scratch "
            "(set training.resume_from_checkpoint: latest to continue it)",
            main_process_only=True,
        )

    def save(s: TrainerState) -> None:
        rank_state = {
            "data": rt.stream.state_dict(),
            "method": rt.method.state_dict(),
            "callbacks": {c.name: c.state_dict() for c in callbacks},
        }
        # what every rank holds identically is written once, by the main process
        shared = {"callbacks": {c.name: c.shared_state_dict() for c in callbacks}} if acc.is_main_process else None
        ckpt.save(s.iteration, asdict(s), rank_state, shared)

    metrics = Path(cfg.training.output_dir) / "logs" / "metrics.jsonl"
    Trainer(
        acc,
        rt.method,
        iter(rt.stream),
        cfg.training,
        state=state,
        save_checkpoint=save,
        metrics_file=metrics,
        callbacks=callbacks,
    ).run()
    out = export(cfg, rt, find_callback(callbacks, EMACallback))
    if cfg.training.push_to_hub and acc.is_main_process:
        from accel_distill.hub import push_export

        url = push_export(out, cfg.training.hub_model_id, private=cfg.training.hub_private)
        logger.info(f"pushed {out} to {url}", main_process_only=True)
    acc.wait_for_everyone()
    acc.end_training()
    return out
