"""Atomic, role-namespaced checkpoints on top of ``accelerator.save_state``.

``save_state`` writes the prepared (trainable) models, their optimizers, the
registered LR schedulers and every process's global RNG. This module adds what
it lacks: which role each saved model belongs to, the trainer's counters, and
per-rank state (data position, the method's noise generators). A checkpoint is
written to a hidden temporary folder and renamed into place only after every
rank finished, so a run killed half-way never leaves a folder ``latest`` could
pick.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from accel_distill.errors import UserError
from accel_distill.roles import trainable_names

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
ROLES_FILE, TRAINER_FILE = "roles.json", "trainer_state.json"
SHARED_FILE = "shared_state.pt"  # state every rank holds identically (e.g. a DDP role's EMA), written once


def rank_file(rank: int) -> str:
    return f"rank_state_{rank}.pt"


def completed_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under ``root``, oldest first (temporary folders are never listed)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(output_dir: str | Path, spec: str | None, roles: dict) -> Path | None:
    """Resolve ``resume_from_checkpoint`` and check it fits ``roles`` -- before any model loads.

    ``latest`` -> the newest finished checkpoint (None if there is none yet); a path -> itself.
    """
    if spec is None:
        return None
    if spec == "latest":
        done = completed_checkpoints(Path(output_dir) / "checkpoints")
        if not done:
            return None
        path = done[-1]
    else:
        path = Path(spec)
        if not (path / TRAINER_FILE).exists():
            raise UserError(f"training.resume_from_checkpoint: {spec} is not a finished checkpoint (no {TRAINER_FILE})")
    saved = json.loads((path / ROLES_FILE).read_text())
    if saved != roles:
        raise UserError(
            f"{path}: checkpoint holds roles {saved['models']} but this run trains {roles['models']}; "
            "resume with the same recipe and roles"
        )
    return path


class AdapterView(torch.nn.Module):
    """What accelerate's loader sees of a LoRA role: only the adapter's weights, loaded strictly."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "inner", model)  # not a submodule: no duplicated state
        self.names = trainable_names(model)

    def state_dict(self, *args, **kwargs) -> dict:
        return {n: v for n, v in self.inner.state_dict().items() if n in self.names}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = self.inner.load_state_dict(state_dict, strict=False)
        missing = [n for n in result.missing_keys if n in self.names]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"adapter checkpoint mismatch: missing {missing}, unexpected {result.unexpected_keys}")
        return torch.nn.modules.module._IncompatibleKeys(missing, result.unexpected_keys)


def save_adapters_only(acc: Accelerator, lora_models: list[torch.nn.Module]) -> None:
    """LoRA roles save and restore only their adapter weights, not the frozen base every time.

    (Under FSDP accelerate writes sharded checkpoints of the whole module instead.)
    """
    ids = {id(m) for m in lora_models}
    if not ids:
        return

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for i, model in enumerate(models):
            if id(model) in ids and i < len(weights):
                keep = trainable_names(model)
                weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    def load_hook(models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            if id(model) in ids:
                models[i] = AdapterView(model)

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)


class CheckpointManager:
    """Save, rotate, find and restore checkpoints under ``<output_dir>/checkpoints``."""

    def __init__(self, accelerator: Accelerator, output_dir: str | Path, *, roles: dict, total_limit: int | None):
        self.accelerator = accelerator
        self.root = Path(output_dir) / "checkpoints"
        self.roles = roles  # {"models": [...], "optimizers": [...], "schedulers": [...]} in prepare order
        self.total_limit = total_limit

    def save(self, iteration: int, trainer_state: dict, rank_state: dict, shared_state: dict | None = None) -> Path:
        """Write checkpoint-<iteration> (collective: every rank calls it).

        ``rank_state`` goes to this rank's file; ``shared_state`` (the same on every rank,
        passed by the main process) is written once.
        """
        acc = self.accelerator
        final = self.root / f"checkpoint-{iteration}"
        tmp = self.root / f".tmp-checkpoint-{iteration}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        torch.save(rank_state, tmp / rank_file(acc.process_index))
        if acc.is_main_process:
            (tmp / ROLES_FILE).write_text(json.dumps(self.roles, indent=2))
            (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=2))
            if shared_state:
                torch.save(shared_state, tmp / SHARED_FILE)
        acc.wait_for_everyone()  # every rank's files are in tmp before it becomes visible
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._rotate()
        acc.wait_for_everyone()
        return final

    def _rotate(self) -> None:
        if self.total_limit is None:
            return
        for old in completed_checkpoints(self.root)[: -self.total_limit]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path) -> tuple[dict, dict, dict]:
        """Restore models/optimizers/schedulers/RNG; return (trainer_state, this rank's state, shared state)."""
        rank_path = path / rank_file(self.accelerator.process_index)
        if not rank_path.exists():
            raise UserError(
                f"{path}: no state for rank {self.accelerator.process_index}; resume on the same world size"
            )
        self.accelerator.load_state(str(path))
        trainer_state = json.loads((path / TRAINER_FILE).read_text())
        shared_path = path / SHARED_FILE
        shared = torch.load(shared_path, weights_only=False) if shared_path.exists() else {}
        return trainer_state, torch.load(rank_path, weights_only=False), shared
