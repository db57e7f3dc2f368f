"""Export a few-step student as a diffusers folder that stock ``WanPipeline`` samples correctly.

The folder holds the trained transformer, the source pipeline's other
components copied byte-for-byte, and a stock flow-matching scheduler
(``FlowMatchLCMScheduler`` for "sde" students, ``FlowMatchEulerDiscreteScheduler``
for "ode" ones) whose config reproduces the training timesteps for
``num_inference_steps=N``. It is written
to a temporary sibling and renamed into place, so a crash never leaves a half
export at ``out_dir``.
"""

from __future__ import annotations

import copy
import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .schedule import FewStepSchedule

EXPORT_INFO_FILE = "accel_distill_export.json"
# Components the export writes itself (or drops) instead of copying from the source.
_REPLACED = {"transformer", "transformer_2", "scheduler"}


def _is_component(name: str, value: Any) -> bool:
    return not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None


def _copied_components(model_index: dict[str, Any], keep_scheduler: bool = False) -> list[str]:
    replaced = _REPLACED - {"scheduler"} if keep_scheduler else _REPLACED
    return sorted(k for k, v in model_index.items() if _is_component(k, v) and k not in replaced)


def _resolve_source(source: str, keep_scheduler: bool) -> Path:
    """Local folder holding ``model_index.json`` and the components to copy (downloads a Hub id)."""
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ConfigError(f"export source {source}: no model_index.json (not a diffusers pipeline folder)")
        return local
    parts = source.split("/")
    if local.exists() or source.startswith((".", "/", "~")) or len(parts) != 2 or not all(parts):
        raise ConfigError(f"export source {source}: not a diffusers pipeline folder nor a Hub id 'owner/name'")

    from huggingface_hub import hf_hub_download, snapshot_download

    index = json.loads(Path(hf_hub_download(source, "model_index.json")).read_text())
    patterns = ["model_index.json"] + [f"{name}/*" for name in _copied_components(index, keep_scheduler)]
    return Path(snapshot_download(source, allow_patterns=patterns))


def _model_index(src: Path, transformer: torch.nn.Module, schedule: FewStepSchedule | None) -> dict[str, Any]:
    """Source ``model_index.json`` with the student transformer and (few-step) scheduler."""
    index = json.loads((src / "model_index.json").read_text())
    index["transformer"] = ["diffusers", type(transformer).__name__]
    if schedule is not None:
        index["scheduler"] = ["diffusers", schedule.scheduler_class]
    if "transformer_2" in index:  # Wan2.2 two-expert sources: the student is a single transformer
        index["transformer_2"] = [None, None]
        if "boundary_ratio" in index:
            index["boundary_ratio"] = None
    return index


def _export_info(schedule: FewStepSchedule | None, source: str, transformer_subfolder: str) -> dict[str, Any]:
    if schedule is None:  # a many-step model (finetune): the source's scheduler and sampling apply
        return {"format_version": 1, "source": source, "source_transformer_subfolder": transformer_subfolder}
    n = schedule.num_inference_steps
    return {
        "format_version": 1,
        "source": source,
        "source_transformer_subfolder": transformer_subfolder,
        "num_inference_steps": n,
        "timesteps": list(schedule.timesteps),
        "sigmas": list(schedule.sigmas),
        "scheduler": {"class": schedule.scheduler_class, **schedule.scheduler_config()},
        "sampling": {
            "num_inference_steps": n,
            "guidance_scale": 1.0,
            "instructions": (
                f"pipe = DiffusionPipeline.from_pretrained(folder); pipe(prompt, num_inference_steps={n}, "
                "guidance_scale=1.0). The DMD student is CFG-free (guidance_scale > 1 doubles cost and "
                f"degrades it); any other step count leaves the {n} trained timesteps."
            ),
        },
    }


def _write(
    tmp: Path,
    transformer: torch.nn.Module,
    source: str,
    schedule: FewStepSchedule | None,
    transformer_subfolder: str,
) -> None:
    keep_scheduler = schedule is None
    src = _resolve_source(source, keep_scheduler)
    index = _model_index(src, transformer, schedule)
    for name in _copied_components(index, keep_scheduler):
        if not (src / name).is_dir():
            raise ConfigError(f"export source {source}: model_index.json lists {name!r} but {name}/ is missing")
        shutil.copytree(src / name, tmp / name)  # follows Hub-cache symlinks: real bytes, unchanged
    transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
    if schedule is not None:
        schedule.make_scheduler().save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    info = _export_info(schedule, source, transformer_subfolder)
    (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _publish(out_dir: str | Path, source: str, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a hidden sibling folder, then swap it in for ``out_dir``."""
    out_dir = Path(out_dir).expanduser().absolute()
    source_dir = Path(source).expanduser()
    if source_dir.is_dir() and out_dir.resolve() == source_dir.resolve():
        raise ConfigError(f"export output folder {out_dir} is the source folder; choose another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"export output folder {out_dir} exists and is not a folder")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{tag}")
    old = out_dir.with_name(f".{out_dir.name}.old-{tag}")
    try:
        tmp.mkdir()
        write(tmp)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def export_student(
    transformer: torch.nn.Module,
    source: str,
    out_dir: str | Path,
    schedule: FewStepSchedule | None,
    *,
    transformer_subfolder: str = "transformer",
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a stock-diffusers pipeline folder for the student at ``out_dir`` and return it.

    ``transformer`` is the trained (unwrapped) diffusers model; ``source`` the folder or
    Hub id the student was distilled from (its subfolder ``transformer_subfolder`` is
    replaced by the student). ``schedule`` None keeps the source's scheduler (many-step
    students). ``info`` adds keys (e.g. the method) to the export info file. ``out_dir``
    is replaced only once the new folder is complete.
    """
    if not hasattr(transformer, "save_pretrained"):
        raise TypeError(f"export_student needs a diffusers model with save_pretrained, got {type(transformer)}")

    def write(tmp: Path) -> None:
        _write(tmp, transformer, source, schedule, transformer_subfolder)
        _add_info(tmp, {"adapter": None, **(info or {})})

    return _publish(out_dir, source, write)


def export_lora(
    transformer: torch.nn.Module,
    source: str,
    out_dir: str | Path,
    schedule: FewStepSchedule | None,
    *,
    merged: bool = False,
    info: dict[str, Any] | None = None,
) -> Path:
    """Export a LoRA student: ``pytorch_lora_weights.safetensors`` the diffusers way, plus the scheduler.

    ``WanPipeline.from_pretrained(base).load_lora_weights(out_dir)`` loads it; with a few-step
    schedule, swap in ``scheduler/`` from ``out_dir`` too. ``merged`` additionally writes the
    adapter fused into a complete pipeline folder at ``out_dir`` (loadable on its own).
    """
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    adapter = get_peft_model_state_dict(transformer)
    metadata = transformer.peft_config["default"].to_dict()

    def write(tmp: Path) -> None:
        if merged:
            fused = copy.deepcopy(transformer)
            fused.fuse_lora()
            fused.unload_lora()
            _write(tmp, fused, source, schedule, "transformer")
        else:
            if schedule is not None:
                schedule.make_scheduler().save_pretrained(tmp / "scheduler")
            (tmp / EXPORT_INFO_FILE).write_text(json.dumps(_export_info(schedule, source, "transformer"), indent=2))
        WanPipeline.save_lora_weights(tmp, transformer_lora_layers=adapter, transformer_lora_adapter_metadata=metadata)
        _add_info(tmp, {"adapter": "lora", "merged": merged, **(info or {})})

    return _publish(out_dir, source, write)


def _add_info(folder: Path, extra: dict[str, Any]) -> None:
    path = folder / EXPORT_INFO_FILE
    info = json.loads(path.read_text())
    info.update(extra)
    path.write_text(json.dumps(info, indent=2) + "\n")
