"""Read a run YAML, apply dotted ``key=value`` overrides, validate everything.

All of this happens before any model is loaded, so a typo costs a second,
not a 14B checkpoint load.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from accel_distill.config.schema import (
    SECTIONS,
    PipelineConfig,
    RecipeConfig,
    RoleConfig,
    RunConfig,
    TrainingConfig,
)
from accel_distill.config.validate import build, check_path, check_range, coerce, fail, suggest
from accel_distill.errors import ConfigError


class StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key repeated in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> dict:
    """The YAML mapping in ``path`` or a one-line ConfigError naming the file (and line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: cannot read config file (not UTF-8 text: byte {e.start})") from None
    try:
        data = yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where} invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}")
    return data


def apply_overrides(data: dict, overrides: Sequence[str], source: str) -> None:
    """Set ``a.b.c=value`` (value parsed as YAML) into ``data`` in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError:
            value = text
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                fail(source, ".".join(parts[: i + 1]), f"is a value, cannot set {key}")
            node = child
        node[parts[-1]] = value


def load_config(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Load, override and fully validate a run configuration."""
    from accel_distill.context_parallel import validate_context_parallel
    from accel_distill.registry import FAMILIES, METHODS, load_builtins

    source = str(path)
    data = read_yaml(source)
    apply_overrides(data, overrides, source)
    for name in data:
        if name not in SECTIONS:
            fail(source, str(name), "unknown section" + suggest(str(name), SECTIONS))
    for name in ("recipe", "roles", "training"):
        if name not in data:
            fail(source, name, "missing required section")

    recipe = build(RecipeConfig, data["recipe"], "recipe", source)
    load_builtins()
    if recipe.family not in FAMILIES:
        fail(source, "recipe.family", f"unknown family {recipe.family!r}; registered: {', '.join(sorted(FAMILIES))}")
    if recipe.method not in METHODS:
        fail(source, "recipe.method", f"unknown method {recipe.method!r}; registered: {', '.join(sorted(METHODS))}")
    family_cls, method_cls = FAMILIES[recipe.family], METHODS[recipe.method]
    missing = sorted(set(method_cls.required_capabilities) - set(family_cls.capabilities))
    if missing:
        fail(
            source,
            "recipe.method",
            f"method {recipe.method!r} needs {', '.join(missing)}, which family {recipe.family!r} does not provide",
        )

    cfg = RunConfig(
        recipe=recipe,
        roles=coerce(dict[str, RoleConfig], data["roles"], "roles", source),
        training=build(TrainingConfig, data["training"], "training", source),
        pipeline_config=build(PipelineConfig, data.get("pipeline_config"), "pipeline_config", source),
        method_config=build(method_cls.config_class, data.get("method_config"), "method_config", source),
        source=source,
        raw=data,
    )
    validate_roles(cfg, method_cls)
    validate_training(cfg)
    validate_speed_switches(cfg)
    validate_context_parallel(cfg)
    family_cls.validate_config(cfg)
    method_cls.validate_config(cfg)
    return cfg


def validate_roles(cfg: RunConfig, method_cls: type) -> None:
    """Roles must be exactly what the method uses, with the right trainability."""
    src, name = cfg.source, cfg.recipe.method
    wanted = ", ".join(method_cls.required_roles)
    for role in method_cls.required_roles:
        if role not in cfg.roles:
            fail(src, f"roles.{role}", f"missing role: method {name!r} needs roles {wanted}")
    for role, rc in cfg.roles.items():
        key = f"roles.{role}"
        if role not in method_cls.required_roles:
            fail(
                src,
                key,
                f"method {name!r} does not use this role (it uses {wanted})" + suggest(role, method_cls.required_roles),
            )
        must = method_cls.role_trainable.get(role)
        if must is not None and rc.trainable != must:
            fail(src, f"{key}.trainable", f"method {name!r} needs this role {'trainable' if must else 'frozen'}")
        check_path(src, f"{key}.path", rc.path, allow_hub=True)
        for extra in ("lora", "ema"):
            if getattr(rc, extra) is not None and not rc.trainable:
                fail(src, f"{key}.{extra}", "only a trainable role can have it")
        if rc.lora is not None:
            check_range(src, f"{key}.lora.rank", rc.lora.rank, 1)
            check_range(src, f"{key}.lora.alpha", rc.lora.alpha, 1e-12)
            check_range(src, f"{key}.lora.dropout", rc.lora.dropout, 0.0, 0.999)
            if not rc.lora.target_modules:
                fail(src, f"{key}.lora.target_modules", "needs at least one module name")
        if rc.ema is not None:
            check_range(src, f"{key}.ema.decay", rc.ema.decay, 0.0, 1.0)
            check_range(src, f"{key}.ema.min_decay", rc.ema.min_decay, 0.0, rc.ema.decay)
            check_range(src, f"{key}.ema.inv_gamma", rc.ema.inv_gamma, 1e-12)
            check_range(src, f"{key}.ema.update_after_step", rc.ema.update_after_step, 0)
        check_range(src, f"{key}.learning_rate", rc.learning_rate, 0.0)
        check_range(src, f"{key}.max_grad_norm", rc.max_grad_norm, 0.0)
        check_range(src, f"{key}.lr_warmup_steps", rc.lr_warmup_steps, 0)
        for i, beta in enumerate(rc.betas or ()):
            check_range(src, f"{key}.betas[{i}]", beta, 0.0, 0.999999)
        _check_scheduler_name(src, f"{key}.lr_scheduler", rc.lr_scheduler)


def _check_scheduler_name(source: str, key: str, name: str | None) -> None:
    from diffusers.optimization import SchedulerType

    valid = [s.value for s in SchedulerType if s.value != "piecewise_constant"]
    if name == "piecewise_constant":  # needs step_rules, which no config key supplies
        fail(source, key, "lr scheduler 'piecewise_constant' is not supported (it needs step_rules)")
    if name is not None and name not in valid:
        fail(source, key, f"unknown lr scheduler {name!r}" + suggest(name, valid))


def check_data_path(source: str, data_path: str | list[str]) -> None:
    """Every local entry of ``training.data_path`` exists (a pattern matches a file); Hub references parse."""
    from accel_distill.data.sources import WILDCARDS, is_hub_reference, parse_hub_reference
    from accel_distill.errors import DataError

    entries = [data_path] if isinstance(data_path, str) else data_path
    if not entries:
        fail(source, "training.data_path", "the list is empty: name at least one file, folder or Hub dataset")
    for i, path in enumerate(entries):
        key = "training.data_path" if isinstance(data_path, str) else f"training.data_path[{i}]"
        if is_hub_reference(path):
            try:
                parse_hub_reference(path)
            except DataError as e:
                fail(source, key, str(e))
        elif any(c in path for c in WILDCARDS):
            if not glob.glob(os.path.expanduser(path), recursive=True):
                fail(source, key, f"no file matches the pattern {path}")
        else:
            check_path(source, key, path)


def validate_training(cfg: RunConfig) -> None:
    """Ranges and paths of the trainer and pipeline sections."""
    src, t, p = cfg.source, cfg.training, cfg.pipeline_config
    for name, low in (
        ("max_train_steps", 1),
        ("train_batch_size", 1),
        ("gradient_accumulation_steps", 1),
        ("dataloader_num_workers", 0),
        ("checkpointing_steps", 1),
        ("checkpoints_total_limit", 1),
        ("max_consecutive_nonfinite", 1),
        ("log_every", 1),
        ("validation_steps", 1),
        ("num_gpus", 1),
        ("learning_rate", 0.0),
        ("weight_decay", 0.0),
        ("adam_epsilon", 0.0),
        ("lr_warmup_steps", 0),
        ("max_grad_norm", 0.0),
    ):
        check_range(src, f"training.{name}", getattr(t, name), low)
    for i, beta in enumerate(t.betas):
        check_range(src, f"training.betas[{i}]", beta, 0.0, 0.999999)
    _check_scheduler_name(src, "training.lr_scheduler", t.lr_scheduler)
    check_data_path(src, t.data_path)
    t.mixed_precision = precision = mixed_precision(cfg)  # resolved once: builder and --dry-run see the same
    trainable = [r for r, rc in cfg.roles.items() if rc.trainable]
    if precision == "fp16" and len(trainable) > 1:
        fail(
            src,
            "training.mixed_precision",
            f"fp16 with several trainable roles ({', '.join(trainable)}) is not supported: accelerate shares one "
            "gradient scaler across their optimizers; use bf16",
        )
    if t.resume_from_checkpoint not in (None, "latest"):
        check_path(src, "training.resume_from_checkpoint", t.resume_from_checkpoint)
    if t.log_validation:
        check_path(src, "training.validation_dataset_file", t.validation_dataset_file)
    for i, n in enumerate(t.validation_sampling_steps):
        check_range(src, f"training.validation_sampling_steps[{i}]", n, 1)
    if t.push_to_hub and not t.hub_model_id:
        fail(src, "training.hub_model_id", "push_to_hub needs the repository id, e.g. your-name/wan-dmd2-3step")
    if t.hub_model_id is not None and (t.hub_model_id.count("/") != 1 or not all(t.hub_model_id.split("/"))):
        fail(src, "training.hub_model_id", f"must look like owner/name, got {t.hub_model_id!r}")
    for tracker in t.trackers:
        if tracker not in ("wandb", "tensorboard"):
            fail(src, "training.trackers", f"unknown tracker {tracker!r}; supported: wandb, tensorboard")
    check_range(src, "pipeline_config.flow_shift", p.flow_shift, 1e-6)
    check_range(src, "pipeline_config.text_max_length", p.text_max_length, 1)
    for name in ("height", "width", "num_frames"):
        check_range(src, f"pipeline_config.{name}", getattr(p, name), 1)
    check_path(src, "pipeline_config.negative_prompt_embeds", p.negative_prompt_embeds)


def mixed_precision(cfg: RunConfig) -> str:
    """The run's mixed precision: the recipe's, else the launcher's, else ``"no"``.

    A recipe value that contradicts the launcher's bf16/fp16 is a config error: which
    one the user meant cannot be guessed.
    """
    from accel_distill.precision import LAUNCH_ENV, MIXED_PRECISIONS, launch_mixed_precision

    recipe, launch = cfg.training.mixed_precision, launch_mixed_precision()
    key = "training.mixed_precision"
    if launch is not None and launch not in MIXED_PRECISIONS:
        fail(cfg.source, key, f"the launcher asks for {launch!r} ({LAUNCH_ENV}); supported: no, bf16, fp16")
    if recipe is not None and launch is not None and recipe != launch:
        fail(
            cfg.source,
            key,
            f"is {recipe!r} but the launcher asks for {launch!r} (accelerate launch --mixed_precision or its "
            "config file); make them agree or leave training.mixed_precision unset",
        )
    return recipe or launch or "no"


def validate_speed_switches(cfg: RunConfig) -> None:
    """Attention backends must be diffusers backends whose packages are installed."""
    names = {"training.attention_backend": cfg.training.attention_backend}
    names.update({f"roles.{r}.attention_backend": rc.attention_backend for r, rc in cfg.roles.items()})
    for key, name in names.items():
        if name is not None:
            check_attention_backend(cfg.source, key, name)


def check_attention_backend(source: str, key: str, name: str) -> None:
    """Fail unless ``name`` is a diffusers attention backend usable here (its kernels installed)."""
    from diffusers.models import attention_dispatch as dispatch

    valid = [b.value for b in dispatch.AttentionBackendName]
    if name not in valid:
        fail(source, key, f"unknown attention backend {name!r}" + suggest(name, valid).replace("keys", "backends"))
    check = getattr(dispatch, "_check_attention_backend_requirements", None)
    if check is None:  # diffusers moved its check: set_attention_backend still refuses at load time
        return
    try:
        check(dispatch.AttentionBackendName(name))
    except (RuntimeError, ImportError) as e:
        fail(source, key, f"attention backend {name!r} is not usable here: {str(e).splitlines()[0]}")


def resolved_dict(cfg: RunConfig) -> dict:
    """The validated configuration as plain data (for --dry-run and trackers)."""
    out = {}
    for name in SECTIONS:
        value = getattr(cfg, name)
        if name == "roles":
            out[name] = {r: dataclasses.asdict(rc) for r, rc in value.items()}
        else:
            out[name] = dataclasses.asdict(value)
    return _plain(out)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
