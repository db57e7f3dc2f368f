"""The model card of an export: a diffusers-style README.md built offline from ``accel_distill_export.json``.

It says what the student is (base model, method, steps, guidance) and how to sample it with
the stock pipeline; ``accel_distill.hub`` writes it before a push.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from accel_distill.errors import UserError

EXPORT_INFO_FILE = "accel_distill_export.json"  # same name as accel_distill.export (kept import-light)
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
CARD_FILE = "README.md"
DEFAULT_PIPELINE_CLASS = "DiffusionPipeline"  # when neither the folder nor the export info names one

# Methods that train a student from a teacher. "finetune" (plain flow matching) is not one.
DISTILLATION_METHODS = frozenset({"dmd", "dmd2", "lcm", "consistency", "sid", "rcm", "self_forcing"})
NON_DISTILLATION_METHODS = frozenset({"finetune", "sft"})
METHOD_TITLES = {
    "dmd2": "DMD2 (Distribution Matching Distillation)",
    "dmd": "DMD (Distribution Matching Distillation)",
    "finetune": "flow-matching fine-tuning",
}


_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_id(source: str | None) -> bool:
    """True when ``source`` reads as a Hub repo id ``owner/name`` rather than a local path."""
    if not source or source.startswith((".", "/", "~")) or "\\" in source or ".." in source:
        return False
    if Path(source).expanduser().exists():  # a relative local folder that happens to look like owner/name
        return False
    return bool(_HUB_ID_RE.match(source))


def read_export_info(folder: str | Path) -> dict[str, Any]:
    """The export's ``accel_distill_export.json``; :class:`UserError` naming the folder if it is not an export."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (expected an accel_distill export folder)")
    info_path = folder / EXPORT_INFO_FILE
    if not info_path.is_file():
        raise UserError(
            f"{folder}: not an accel_distill export (no {EXPORT_INFO_FILE}); "
            "push the export folder (training.export_dir, default <output_dir>/export), not the run folder"
        )
    try:
        info = json.loads(info_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{info_path}: unreadable export info ({e})") from None
    if not isinstance(info, dict):
        raise UserError(f"{info_path}: export info must be a JSON object")
    if not (folder / "model_index.json").is_file() and not (folder / LORA_WEIGHTS_FILE).is_file():
        raise UserError(f"{folder}: export holds neither model_index.json nor {LORA_WEIGHTS_FILE}")
    return info


def _method(info: dict[str, Any]) -> str | None:
    method = str(info.get("method") or "").strip().lower()
    return method or None


def _is_distilled(info: dict[str, Any]) -> bool:
    method = _method(info)
    if method in NON_DISTILLATION_METHODS:
        return False
    return method in DISTILLATION_METHODS or info.get("num_inference_steps") is not None


def _tag(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-")


def _fmt_number(x: Any) -> str:
    return str(int(x)) if isinstance(x, (int, float)) and float(x).is_integer() else str(x)


def _pipeline_class(folder: Path, info: dict[str, Any]) -> str:
    """The export's stock pipeline: its model_index.json's, else the one the export info records."""
    try:
        name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        name = None
    name = name or info.get("pipeline_class")
    return name if isinstance(name, str) and name.isidentifier() else DEFAULT_PIPELINE_CLASS


def _vae_lines(vae_class: str | None, repo: str) -> tuple[set[str], str, str]:
    """(imports, the line loading the VAE in fp32, the pipeline's vae= argument) when the family names a VAE."""
    if not (isinstance(vae_class, str) and vae_class.isidentifier()):
        return set(), "", ""
    return (
        {vae_class},
        f'vae = {vae_class}.from_pretrained({repo}, subfolder="vae", torch_dtype=torch.float32)\n',
        "vae=vae, ",
    )


def card_tags(info: dict[str, Any]) -> list[str]:
    """Hub tags for an export: diffusers, text-to-video, distillation, the method, lora, few-step, accel_distill."""
    tags = ["diffusers", "text-to-video"]
    method = _method(info)
    if _is_distilled(info):
        tags.append("distillation")
    if method:
        tags.append(_tag(method))
    if info.get("adapter"):
        tags.append(_tag(str(info["adapter"])))
    if info.get("num_inference_steps") is not None:
        tags.append("few-step")
    tags.append("accel_distill")
    return list(dict.fromkeys(t for t in tags if t))


def _call_args(pipeline_class: str, steps: int | None, guidance: float | None) -> tuple[str, str]:
    """(extra lines before the call, the call's arguments): an image-to-video pipeline also takes the image."""
    before, args = "", '"A cat walks on the grass, realistic"'
    if "ImageToVideo" in pipeline_class:
        before = 'image = load_image("first_frame.png")  # the video starts from this image\n'
        args = "image=image, prompt=" + args
    if steps is not None:
        args += f", num_inference_steps={steps}"
    if guidance is not None:
        args += f", guidance_scale={guidance}"
    return before, args


def _usage_full(
    repo_id: str, pipeline_class: str, steps: int | None, guidance: float | None, vae_class: str | None = None
) -> str:
    image_line, call_args = _call_args(pipeline_class, steps, guidance)
    vae_imports, vae_line, vae_arg = _vae_lines(vae_class, "repo_id")
    imports = ", ".join(sorted({pipeline_class, *vae_imports}))
    return f"""```python
import torch
from diffusers import {imports}
from diffusers.utils import export_to_video{", load_image" if image_line else ""}

repo_id = "{repo_id}"
{vae_line}pipe = {pipeline_class}.from_pretrained(repo_id, {vae_arg}torch_dtype=torch.bfloat16).to("cuda")
{image_line}video = pipe({call_args}).frames[0]
export_to_video(video, "output.mp4", fps=16)
```"""


def _usage_lora(
    repo_id: str,
    base: str,
    pipeline_class: str,
    scheduler_class: str | None,
    steps: int | None,
    guidance: float | None,
    vae_class: str | None = None,
) -> str:
    image_line, call_args = _call_args(pipeline_class, steps, guidance)
    vae_imports, vae_line, vae_arg = _vae_lines(vae_class, "base_model")
    imports = ", ".join(sorted({pipeline_class, *vae_imports, *([scheduler_class] if scheduler_class else [])}))
    swap = ""
    if scheduler_class:
        swap = (
            "# the exported scheduler reproduces the timesteps the student was trained on\n"
            f'pipe.scheduler = {scheduler_class}.from_pretrained(repo_id, subfolder="scheduler")\n'
        )
    return f"""```python
import torch
from diffusers import {imports}
from diffusers.utils import export_to_video{", load_image" if image_line else ""}

base_model = "{base}"
repo_id = "{repo_id}"
{vae_line}pipe = {pipeline_class}.from_pretrained(base_model, {vae_arg}torch_dtype=torch.bfloat16)
pipe.load_lora_weights(repo_id)
{swap}pipe.to("cuda")
{image_line}video = pipe({call_args}).frames[0]
export_to_video(video, "output.mp4", fps=16)
```"""


def model_card_text(folder: str | Path, repo_id: str) -> str:
    """The model card (YAML metadata + markdown body) for the export at ``folder`` published as ``repo_id``."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder).expanduser()
    info = read_export_info(folder)
    source = str(info.get("source") or "")
    hub_source = source if is_hub_id(source) else None
    method = _method(info)
    adapter = info.get("adapter")
    is_lora = str(adapter).lower() == "lora" or (folder / LORA_WEIGHTS_FILE).is_file()
    has_pipeline = (folder / "model_index.json").is_file()
    steps = info.get("num_inference_steps")
    sampling = info.get("sampling") if isinstance(info.get("sampling"), dict) else {}
    steps = steps if steps is not None else sampling.get("num_inference_steps")
    guidance = sampling.get("guidance_scale", 1.0 if steps is not None else None)
    scheduler = info.get("scheduler") if isinstance(info.get("scheduler"), dict) else {}
    scheduler_class = scheduler.get("class") if steps is not None else None
    if scheduler_class is not None and not str(scheduler_class).isidentifier():
        scheduler_class = None
    has_scheduler = (folder / "scheduler" / "scheduler_config.json").is_file()
    pipeline_class = _pipeline_class(folder, info)
    vae_class = info.get("vae_class")  # the family's VAE, loaded in fp32 (older exports: the pipeline's own)

    task = "image-to-video" if "ImageToVideo" in pipeline_class else "text-to-video"
    data = ModelCardData(
        base_model=hub_source,
        library_name="diffusers",
        pipeline_tag=task,
        tags=[task if t == "text-to-video" else t for t in card_tags(info)],
    )

    base_text = f"[{hub_source}](https://huggingface.co/{hub_source})" if hub_source else "a local base model"
    title = METHOD_TITLES.get(method or "", method or "")
    kind = "LoRA adapter for a " if is_lora and not has_pipeline else ""
    if _is_distilled(info):
        what = f"{steps}-step " if steps is not None else ""
        summary = f"A {kind}{what}{task} model distilled from {base_text}"
        summary += f" with {title}." if title else "."
    else:
        summary = f"A {kind}{task} model fine-tuned from {base_text}"
        summary += f" ({title})." if title else "."

    facts = []
    if method:
        facts.append(f"- **Method:** {title}")
    facts.append(f"- **Base model:** {hub_source or 'a local model (not on the Hub)'}")
    if adapter:
        facts.append(f"- **Adapter:** {adapter} (`{LORA_WEIGHTS_FILE}`)")
    for name, meta in (info.get("extra_lora_files") or {}).items():
        layout = meta.get("layout", "") if isinstance(meta, dict) else ""
        facts.append(f"- **Also:** `{name}` ({layout} key layout, e.g. for ComfyUI)")
    if steps is not None:
        timesteps = ", ".join(_fmt_number(t) for t in info.get("timesteps") or [])
        facts.append(f"- **Sampling steps:** {steps}")
        if timesteps:
            total = _fmt_number(scheduler.get("num_train_timesteps", 1000))
            facts.append(f"- **Timesteps:** [{timesteps}] (of {total} training timesteps)")
        if guidance is not None:
            cfg_free = guidance == 1 and _is_distilled(info)
            note = " (the student is CFG-free; a larger value doubles the cost and degrades it)" if cfg_free else ""
            facts.append(f"- **Guidance scale:** {guidance}{note}")
    if scheduler_class and has_scheduler:
        facts.append(
            f"- **Scheduler:** stock `{scheduler_class}` in `scheduler/`, configured so that "
            f"`num_inference_steps={steps}` reproduces exactly the timesteps above"
        )
    if steps is None:
        facts.append("- **Sampling:** the base model's scheduler and settings apply")

    sections = [f"# {repo_id}", summary, "\n".join(facts), "## Usage"]
    if has_pipeline:
        sections.append(
            f"Stock diffusers, no extra code:\n\n{_usage_full(repo_id, pipeline_class, steps, guidance, vae_class)}"
        )
    if is_lora:
        base = hub_source or "path/to/the/base/model"
        lead = "As a LoRA on the base pipeline:" if has_pipeline else "Load the base pipeline, then the LoRA:"
        swap = scheduler_class if has_scheduler else None  # only a scheduler the repo holds
        usage = _usage_lora(repo_id, base, pipeline_class, swap, steps, guidance, vae_class)
        sections.append(f"{lead}\n\n{usage}")
    if steps is not None:
        sections.append(
            f"Use `num_inference_steps={steps}`: any other step count leaves the timesteps the model was trained on."
        )
    sections.append(
        "Trained with accel_distill (accelerate + diffusers). "
        f"`{EXPORT_INFO_FILE}` records the source model, timesteps, sigmas and scheduler config."
    )
    body = "\n\n".join(sections) + "\n"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def write_model_card(folder: str | Path, repo_id: str) -> Path:
    """Write ``README.md`` (the model card) into the export ``folder`` and return its path.

    Built offline from the export info only (any existing README.md is replaced):
    nothing is fetched from the Hub and no token is involved.
    """
    path = Path(folder).expanduser() / CARD_FILE
    path.write_text(model_card_text(folder, repo_id), encoding="utf-8")
    return path
