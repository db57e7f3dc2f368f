"""Export a few-step student as a diffusers folder that the source's stock pipeline samples correctly.

The folder holds the trained transformer(s) (both experts of a two-expert
model), the source pipeline's other components copied byte-for-byte, and the
stock scheduler (e.g. ``FlowMatchLCMScheduler`` for "sde" rectified-flow
students, ``FlowMatchEulerDiscreteScheduler`` for "ode" ones) whose config
reproduces the training timesteps for ``num_inference_steps=N``. The pipeline
class is the source's own (``model_index.json``'s ``_class_name``), so this
module names no family. It is written
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
from typing import Any, NamedTuple

import torch

from .errors import ConfigError
from .schedule import StockSchedule

EXPORT_INFO_FILE = "accel_distill_export.json"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
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

    from huggingface_hub import snapshot_download

    index = source_index(source)
    patterns = ["model_index.json"] + [f"{name}/*" for name in _copied_components(index, keep_scheduler)]
    return Path(snapshot_download(source, allow_patterns=patterns))


def _model_index(
    src: Path, modules: dict[str, torch.nn.Module], schedule: StockSchedule | None, updates: dict[str, Any]
) -> dict[str, Any]:
    """Source ``model_index.json`` with the student's modules, its (few-step) scheduler and the family's keys."""
    index = json.loads((src / "model_index.json").read_text())
    for key, module in modules.items():
        index[key] = ["diffusers", type(module).__name__]
    if schedule is not None:
        index["scheduler"] = ["diffusers", schedule.scheduler_class]
    index.update(updates)
    return index


def lora_file(key: str) -> str:
    """The LoRA file of module ``key``: diffusers' default name for the transformer, one per other expert."""
    return LORA_WEIGHTS_FILE if key == "transformer" else f"pytorch_lora_weights_{key}.safetensors"


class LoraFile(NamedTuple):
    """A LoRA file written next to diffusers' own (a family's layout for other loaders)."""

    module: str  # the module key whose adapter it holds ("transformer", "transformer_2")
    layout: str  # the key layout, e.g. "original-wan"
    state: dict[str, torch.Tensor]


# {module key: (peft state dict without the adapter name, LoraConfig.to_dict())}
LoraAdapters = dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]


def lora_adapters(student: torch.nn.Module | dict[str, torch.nn.Module]) -> LoraAdapters:
    """Each module's peft adapter "default": its weights (keys ``<layer>.lora_A.weight``) and config."""
    from peft.utils import get_peft_model_state_dict

    modules = _as_modules(student)
    return {k: (get_peft_model_state_dict(m), m.peft_config["default"].to_dict()) for k, m in modules.items()}


def source_index(source: str) -> dict[str, Any]:
    """The source's ``model_index.json`` alone (a local folder, or that one file from the Hub)."""
    local = Path(source).expanduser()
    if local.is_dir():
        return json.loads((local / "model_index.json").read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(source, "model_index.json")).read_text())


def pipeline_classes(index: dict[str, Any]) -> dict[str, Any]:
    """The stock pipeline and VAE classes of a source's model index, for the export info and the model card."""
    vae = index.get("vae")
    return {"pipeline_class": index.get("_class_name"), "vae_class": vae[1] if _is_component("vae", vae) else None}


def _export_info(schedule: StockSchedule | None, source: str, transformer_subfolder: str) -> dict[str, Any]:
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
    modules: dict[str, torch.nn.Module],
    source: str,
    schedule: StockSchedule | None,
    transformer_subfolder: str,
    updates: dict[str, Any],
) -> None:
    keep_scheduler = schedule is None
    src = _resolve_source(source, keep_scheduler)
    index = _model_index(src, modules, schedule, updates)
    for name in _copied_components(index, keep_scheduler):
        if not (src / name).is_dir():
            raise ConfigError(f"export source {source}: model_index.json lists {name!r} but {name}/ is missing")
        shutil.copytree(src / name, tmp / name)  # follows Hub-cache symlinks: real bytes, unchanged
    for key, module in modules.items():
        module.save_pretrained(tmp / key, safe_serialization=True)
    if schedule is not None:
        schedule.make_scheduler().save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    info = {**_export_info(schedule, source, transformer_subfolder), **pipeline_classes(index)}
    info["modules"] = list(modules)
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


Modules = dict[str, torch.nn.Module]


def _as_modules(student: torch.nn.Module | Modules) -> Modules:
    return dict(student) if isinstance(student, dict) else {"transformer": student}


def export_student(
    student: torch.nn.Module | Modules,
    source: str,
    out_dir: str | Path,
    schedule: StockSchedule | None,
    *,
    transformer_subfolder: str = "transformer",
    index_updates: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a stock-diffusers pipeline folder for the student at ``out_dir`` and return it.

    ``student`` is the trained (unwrapped) diffusers model, or ``{module key: model}`` for a
    student of several modules (``transformer`` and ``transformer_2`` of a two-expert model);
    ``source`` the folder or Hub id it was distilled from (its subfolder ``transformer_subfolder``
    is replaced by the student). ``schedule`` None keeps the source's scheduler (many-step
    students). ``index_updates`` are the family's extra ``model_index.json`` keys (e.g.
    ``boundary_ratio``); ``info`` adds keys (e.g. the method) to the export info file.
    ``out_dir`` is replaced only once the new folder is complete.
    """
    modules = _as_modules(student)
    for key, module in modules.items():
        if not hasattr(module, "save_pretrained"):
            raise TypeError(f"export_student needs diffusers models with save_pretrained, got {type(module)} for {key}")

    def write(tmp: Path) -> None:
        _write(tmp, modules, source, schedule, transformer_subfolder, index_updates or {})
        _add_info(tmp, {"adapter": None, **(info or {})})

    return _publish(out_dir, source, write)


def export_lora(
    student: torch.nn.Module | Modules,
    source: str,
    out_dir: str | Path,
    schedule: StockSchedule | None,
    *,
    merged: bool = False,
    index_updates: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    extra_files: dict[str, LoraFile] | None = None,
) -> Path:
    """Export a LoRA student: its adapter(s) the diffusers way, plus the scheduler.

    ``Pipeline.from_pretrained(base).load_lora_weights(out_dir)`` loads the transformer's
    ``pytorch_lora_weights.safetensors``; a second expert's file loads with
    ``weight_name=..., load_into_transformer_2=True``. With a few-step schedule, swap in
    ``scheduler/`` from ``out_dir`` too. ``merged`` additionally writes the adapters fused
    into a complete pipeline folder at ``out_dir`` (loadable on its own). ``extra_files``
    (``{file name: LoraFile}``, the family's layouts for other loaders) are written beside
    them and listed in the export info as ``extra_lora_files``.
    """
    import diffusers
    from safetensors.torch import save_file

    modules = _as_modules(student)
    adapters = lora_adapters(modules)
    extra_files = extra_files or {}
    clash = sorted(set(extra_files) & {lora_file(k) for k in modules})
    if clash:
        raise ValueError(f"extra LoRA files {clash} would overwrite diffusers' LoRA files")

    def write(tmp: Path) -> None:
        classes = pipeline_classes(source_index(source))
        if merged:
            fused = {}
            for key, module in modules.items():
                fused[key] = copy.deepcopy(module)
                fused[key].fuse_lora()
                fused[key].unload_lora()
            _write(tmp, fused, source, schedule, "transformer", index_updates or {})
        else:
            if schedule is not None:
                schedule.make_scheduler().save_pretrained(tmp / "scheduler")
            export_info = {**_export_info(schedule, source, "transformer"), **classes}
            (tmp / EXPORT_INFO_FILE).write_text(json.dumps(export_info, indent=2))
        pipeline = getattr(diffusers, classes["pipeline_class"])
        files = {}
        for key, (state, metadata) in adapters.items():  # each expert its own file, in the transformer layout
            files[key] = lora_file(key)
            pipeline.save_lora_weights(
                tmp, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata, weight_name=files[key]
            )
        extra = {}
        for name, f in extra_files.items():
            save_file(f.state, tmp / name, metadata={"format": "pt", "layout": f.layout, "module": f.module})
            extra[name] = {"module": f.module, "layout": f.layout}
        _add_info(
            tmp, {"adapter": "lora", "merged": merged, "lora_files": files, "extra_lora_files": extra, **(info or {})}
        )

    return _publish(out_dir, source, write)


def _add_info(folder: Path, extra: dict[str, Any]) -> None:
    path = folder / EXPORT_INFO_FILE
    info = json.loads(path.read_text())
    info.update(extra)
    path.write_text(json.dumps(info, indent=2) + "\n")
