"""The run configuration: typed sections of the YAML file.

Field types drive validation (``config/validate.py``); defaults are the
documented defaults. Method-specific settings live in each method's own
dataclass (``method_config``), so adding a method never edits this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal


@dataclass
class RecipeConfig:
    """Which model family and which training method to run."""

    family: str
    method: str


@dataclass
class LoraSpec:
    """A peft LoRA adapter on the role's transformer: only the adapter trains and is saved."""

    rank: int = 16
    alpha: float | None = None  # default: rank (scale 1)
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0
    # peft's init_lora_weights: "default" (B = 0), "gaussian", "pissa", "olora"
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    # Also export the adapter fused into a full transformer (the LoRA file is always written).
    export_merged: bool = False


@dataclass
class EMASpec:
    """Exponential moving average of a trainable role, kept in fp32 and stepped with its optimizer."""

    decay: float = 0.999
    # diffusers EMAModel warm-up: decay_t = 1 - (1 + t / inv_gamma) ** -power, capped at decay
    use_warmup: bool = False
    inv_gamma: float = 1.0
    power: float = 2 / 3
    min_decay: float = 0.0
    update_after_step: int = 0
    # Export / validate with the averaged weights instead of the raw ones.
    export: bool = True
    validate: bool = True


@dataclass
class RoleConfig:
    """One participant (student, teacher, critic, ...) and how it trains.

    Optimizer settings left unset inherit from ``training``; the critic may
    therefore run its own learning rate and betas (FastVideo's
    ``fake_score_learning_rate`` / ``fake_score_betas``).
    """

    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "family": "removed: every role belongs to recipe.family; delete the key",
    }

    path: str
    trainable: bool = False
    subfolder: str = "transformer"
    revision: str | None = None
    # Weight dtype of the role. Default: fp32 master weights for trainable roles,
    # the mixed-precision dtype for frozen ones (a bf16 teacher halves its memory).
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    gradient_checkpointing: bool = False
    # Speed switches; unset inherits training.attention_backend / training.compile.
    attention_backend: str | None = None
    compile: bool | None = None
    # Frozen roles under FSDP: only rank 0 reads the weights, the others receive their shards.
    rank0_loading: bool = True
    lora: LoraSpec | None = None
    ema: EMASpec | None = None
    learning_rate: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    adam_epsilon: float | None = None
    lr_scheduler: str | None = None
    lr_warmup_steps: int | None = None
    max_grad_norm: float | None = None


@dataclass
class TrainingConfig:
    """Infrastructure: data, loop, optimizer defaults, checkpoints, logging."""

    output_dir: str
    # One source or a list: local parquet files / folders / patterns, hf://datasets/OWNER/NAME[@REV][/PATH].
    data_path: str | list[str]
    seed: int = 0
    max_train_steps: int = 1000
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    dataloader_num_workers: int = 2
    shuffle: bool = True
    num_gpus: int | None = None
    # Unset: the launcher's setting (accelerate launch --mixed_precision / its config file), else "no".
    # Set and different from a launcher's bf16/fp16: a config error. YAML's bare `no` (false) means "no".
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    allow_tf32: bool = True
    # diffusers attention backend of every role's transformer ("native" SDPA, "flash", "_flash_3",
    # "sage", "flex", ...; see diffusers' AttentionBackendName). Unset: diffusers' default (native).
    attention_backend: str | None = None
    # Regional torch.compile of each role's transformer blocks (diffusers compile_repeated_blocks).
    compile: bool = False
    # Context parallelism (long videos): each role's attention split over groups of this many ranks by
    # diffusers' own Ulysses ("ulysses": all-to-all over heads) or ring attention; must divide the processes.
    context_parallel_size: int = 1
    context_parallel_mode: Literal["ulysses", "ring"] = "ulysses"

    learning_rate: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0

    max_consecutive_nonfinite: int = 5

    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    export_dir: str | None = None

    log_every: int = 1
    trackers: list[str] = field(default_factory=list)
    tracker_project_name: str = "accel_distill"
    wandb_run_name: str | None = None

    log_validation: bool = False
    validation_at_start: bool = False
    validation_steps: int = 500
    validation_dataset_file: str | None = None
    # Default: the student's trained step count (few-step methods) or 50.
    validation_sampling_steps: list[int] = field(default_factory=list)
    # Default: 1.0 (a DMD student is CFG-free).
    validation_guidance_scale: list[float] = field(default_factory=list)

    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False


@dataclass
class PipelineConfig:
    """Model-side settings shared by all methods of a family."""

    # Timestep shift of the flow-matching schedule; default: the student's scheduler config.
    flow_shift: float | None = None
    # How few-step students move between their steps: "sde" re-noises the predicted
    # x0 (DMD / FlowMatchLCMScheduler), "ode" takes Euler steps (FlowMatchEulerDiscreteScheduler).
    sampler_kind: Literal["ode", "sde"] = "sde"
    # Prompt embeddings are zero-padded to this length, as diffusers' WanPipeline does.
    text_max_length: int = 512
    # Unconditional embedding for CFG: a tensor file ([L, D]) or a prompt encoded once at start-up.
    negative_prompt_embeds: str | None = None
    negative_prompt: str = ""
    # Two-expert models (Wan2.2 A14B): t >= boundary_ratio * 1000 runs the high-noise expert
    # (transformer), below it the low-noise one (transformer_2). Default: the model's model_index.json.
    boundary_ratio: float | None = None
    # Video size for data-free (text-only) rollouts; ignored when the data carry latents.
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None


SECTIONS = ("recipe", "roles", "training", "pipeline_config", "method_config")


@dataclass
class RunConfig:
    """The whole run, validated. ``method_config`` is the method's own dataclass."""

    recipe: RecipeConfig
    roles: dict[str, RoleConfig]
    training: TrainingConfig
    pipeline_config: PipelineConfig
    method_config: object
    source: str = "<config>"
    raw: dict = field(default_factory=dict, repr=False)

    def role_defaults(self, role: str) -> dict:
        """Optimizer settings of ``role`` with ``training`` defaults filled in."""
        r, t = self.roles[role], self.training
        pick = lambda name: getattr(r, name) if getattr(r, name) is not None else getattr(t, name)  # noqa: E731
        names = ("learning_rate", "betas", "weight_decay", "adam_epsilon", "lr_scheduler", "lr_warmup_steps")
        out = {n: pick(n) for n in names}
        out["max_grad_norm"] = r.max_grad_norm if r.max_grad_norm is not None else t.max_grad_norm
        return out
