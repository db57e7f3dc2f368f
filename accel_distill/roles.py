"""Roles: the named participants of a run and their training state.

A role is only a string key ("student", "teacher", "critic", ...); the trainer
and the checkpointing treat every role alike. Methods look roles up by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def apply_trainable(module: torch.nn.Module, trainable: bool) -> torch.nn.Module:
    """The one place that sets requires_grad and train/eval mode together."""
    module.requires_grad_(trainable)
    module.train(trainable)
    return module


def attach_lora(module: torch.nn.Module, spec) -> torch.nn.Module:
    """Freeze the base, add a peft LoRA adapter (diffusers ``add_adapter``), keep adapter weights in fp32."""
    from diffusers.training_utils import cast_training_params

    module.requires_grad_(False)
    module.add_adapter(lora_config(spec))
    cast_training_params(module, dtype=torch.float32)
    module.train(True)
    return module


def lora_config(spec):
    """The peft ``LoraConfig`` of a :class:`~accel_distill.config.schema.LoraSpec`."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha if spec.alpha is not None else spec.rank,
        target_modules=list(spec.target_modules),
        lora_dropout=spec.dropout,
        init_lora_weights=True if spec.init == "default" else spec.init,
    )


def trainable_names(module: torch.nn.Module) -> set[str]:
    """State-dict names of the parameters that train (all of them, or a LoRA adapter's)."""
    return {name for name, p in module.named_parameters() if p.requires_grad}


def unit_name(role: str, key: str, keys) -> str:
    """What a role's trainable module is called in logs, checkpoints and EMA: the role when it has one
    module, ``role.key`` (e.g. ``student.transformer_2``) when it has several."""
    return role if len(keys) == 1 else f"{role}.{key}"


@dataclass
class RoleHandle:
    """One role's modules and, when trainable, one optimizer and LR scheduler per module."""

    name: str
    modules: dict[str, torch.nn.Module]
    trainable: bool
    dtype: torch.dtype
    max_grad_norm: float | None = None
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    lr_schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = field(default_factory=dict)
    source: str = ""
    lora: object | None = None  # the role's LoraSpec when only an adapter trains

    @property
    def transformer(self) -> torch.nn.Module:
        """The role's (first) transformer: the only one of single-expert models, the high-noise one of two."""
        return self.modules["transformer"]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of a single-module role."""
        (opt,) = self.optimizers.values()
        return opt

    @property
    def lr_scheduler(self):
        """The LR scheduler of a single-module role."""
        (sched,) = self.lr_schedulers.values()
        return sched

    def unit(self, key: str) -> str:
        return unit_name(self.name, key, self.modules)

    def units(self) -> list[tuple[str, torch.nn.Module, torch.optim.Optimizer, object]]:
        """(unit name, module, optimizer, LR scheduler) of each trainable module, in load order."""
        return [(self.unit(k), m, self.optimizers[k], self.lr_schedulers[k]) for k, m in self.modules.items()]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters()]


@dataclass
class ModelBundle:
    """All roles of a run, keyed by role name."""

    roles: dict[str, RoleHandle] = field(default_factory=dict)

    def __getitem__(self, name: str) -> RoleHandle:
        return self.roles[name]

    def __contains__(self, name: str) -> bool:
        return name in self.roles

    def require(self, names: tuple[str, ...], method: str) -> None:
        missing = [n for n in names if n not in self.roles]
        if missing:
            raise ValueError(f"method {method!r} needs roles {', '.join(names)}; missing: {', '.join(missing)}")

    @property
    def trainable(self) -> dict[str, RoleHandle]:
        return {n: r for n, r in self.roles.items() if r.trainable}
