"""The method contract (FastGen style) the trainer calls, and its shared plumbing.

A method owns the algorithm, its roles, its update schedule and its losses.
The trainer only calls ``train_step``, ``backward`` on ``total_loss`` and,
after the last micro-batch, ``optimizers_schedulers_step`` /
``optimizers_zero_grad``. A scheduler steps exactly when its optimizer does.
A method whose step builds two graphs one after the other may backpropagate the
first at once with :meth:`DistillMethod.backward_now` (the trainer's backward), so
its activations are freed before the second graph's are made.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from accel_distill.config.schema import RunConfig
from accel_distill.families.base import Conditioning, ModelAdapter
from accel_distill.registry import FAMILIES
from accel_distill.roles import ModelBundle, RoleHandle
from accel_distill.schedule import StockSchedule


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, rank, stream, ...) without the collisions of seed + rank + iter."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


SHARED_STREAM, PRIVATE_STREAM = 0, 1


class SampleNoise:
    """Random draws per sample, from streams keyed by (seed, epoch, global row).

    A sample gets the same noise whatever the batch size, accumulation or world size:
    2 processes x batch b reproduce 1 process x batch 2b, and there is no generator
    state to checkpoint. Draws are float32 and stacked along the batch.
    """

    def __init__(self, seed: int, sample_keys, device: torch.device):
        self.device = device
        keys = sample_keys.tolist() if torch.is_tensor(sample_keys) else sample_keys
        self.gens = [
            torch.Generator(device).manual_seed(derived_seed(seed, PRIVATE_STREAM, epoch, row)) for epoch, row in keys
        ]

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g, device=self.device) for g in self.gens])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(tuple(x.shape[1:]))

    def rand(self) -> torch.Tensor:
        return torch.cat([torch.rand(1, generator=g, device=self.device) for g in self.gens])

    def randint(self, high: int) -> torch.Tensor:
        return torch.cat([torch.randint(high, (1,), generator=g, device=self.device) for g in self.gens])


def student_schedule(cfg: RunConfig, steps_key: str, tolerance: float) -> StockSchedule:
    """The stock schedule of a few-step student's timesteps ``method_config.<steps_key>``, fitted by the family:
    the student trains at exactly its timesteps and the export's scheduler config reproduces them."""
    return FAMILIES[cfg.recipe.family].few_step_schedule(
        cfg,
        getattr(cfg.method_config, steps_key),
        key=f"{cfg.source}: method_config.{steps_key}",
        tolerance=tolerance,
        kind=cfg.pipeline_config.sampler_kind,
    )


def describe_schedule(schedule: StockSchedule) -> str:
    """``student timesteps [...] (<kind> sampler)``, for a few-step method's ``--dry-run`` lines."""
    steps = ", ".join(f"{t:.1f}" for t in schedule.timesteps)
    return f"student timesteps [{steps}] ({schedule.kind} sampler)"


class DistillMethod(ABC):
    """Base class of training methods. Subclass, set the class attributes, register."""

    name: str = ""
    config_class: type
    required_roles: tuple[str, ...] = ()
    # role -> must it be trainable (True) or frozen (False)
    role_trainable: dict[str, bool] = {}
    required_capabilities: frozenset[str] = frozenset()
    # The role whose weights are the product of the run (exported, validated, its source's VAE decodes).
    product_role: str = "student"

    def __init__(
        self,
        bundle: ModelBundle,
        adapter: ModelAdapter,
        cfg: RunConfig,
        *,
        device: torch.device,
        neg_cond: torch.Tensor | None = None,
    ):
        bundle.require(self.required_roles, self.name)
        missing = self.required_capabilities - adapter.capabilities
        if missing:
            raise ValueError(f"method {self.name!r} needs adapter capabilities {sorted(missing)}")
        self.bundle, self.adapter, self.cfg = bundle, adapter, cfg
        self.noise = adapter.noise  # methods speak x0 and noise; the schedule translates
        self.config = cfg.method_config
        self.device = device
        self.neg_cond = None if neg_cond is None else neg_cond.to(device)
        self.seed = cfg.training.seed
        # Per-sample noise comes from SampleNoise; this stream is identical on every rank,
        # for choices that change the compute graph (sharded models need the same
        # forwards on every rank).
        # On the CPU: reading a draw from it never waits for the accelerator.
        self.shared_gen = torch.Generator().manual_seed(derived_seed(self.seed, SHARED_STREAM))
        # One sample's latent [C, T, H, W] for data-free rollouts; set from pipeline_config.
        self.latent_shape: tuple[int, ...] | None = None
        # The run's EMA callback (None without one), set by the runner: the averaged weights a
        # method may need (e.g. a consistency target) are ``self.ema.averaged(role)``.
        self.ema = None
        # The trainer's backward while it runs train_step (see backward_now); None on a direct call.
        self._backward: Callable[[torch.Tensor], None] | None = None

    # --- config-time hooks ------------------------------------------------------------
    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        """Cross-field checks of ``method_config`` (raise via ``config.validate.fail``)."""
        return None

    @classmethod
    def needs_latents(cls, cfg: RunConfig) -> bool:
        """Whether batches must carry data latents (False: text-only data suffice)."""
        return True

    @classmethod
    def extra_tensor_columns(cls, cfg: RunConfig) -> dict[str, str]:
        """Per-row tensors the method reads from the data besides the family's (e.g. teacher trajectories):
        ``{name: why}``, the reason the one-line error for a missing column gives."""
        return {}

    @classmethod
    def needs_negative_conditioning(cls, cfg: RunConfig) -> bool:
        """Whether the method uses the unconditional (negative-prompt) embedding."""
        return False

    @classmethod
    def optimizer_steps(cls, cfg: RunConfig, role: str) -> int:
        """How many times ``role``'s optimizer steps in the run: the length of its LR schedule."""
        return cfg.training.max_train_steps

    @classmethod
    def auxiliary_names(cls, cfg: RunConfig) -> tuple[str, ...]:
        """Names of the trainable networks the method builds itself (a discriminator head, ...), known
        from the config alone: they are checkpointed under these names, after the configured roles."""
        return ()

    @classmethod
    def auxiliary_settings(cls, cfg: RunConfig, name: str) -> dict:
        """Optimizer, LR-schedule and clipping settings of auxiliary network ``name`` (the keys of
        :meth:`RunConfig.role_defaults`): ``training``'s by default."""
        t = cfg.training
        keys = ("learning_rate", "betas", "weight_decay", "adam_epsilon", "lr_scheduler", "lr_warmup_steps")
        return {**{k: getattr(t, k) for k in keys}, "max_grad_norm": t.max_grad_norm}

    def build_callbacks(self) -> list:
        """The method's own callbacks (e.g. the EMA of a consistency target), run and checkpointed by name
        with the run's: the trainer steps, saves and restores them without knowing what they are."""
        return []

    def build_auxiliary(self) -> dict[str, torch.nn.Module]:
        """The method's own trainable networks by name (:meth:`auxiliary_names`), built after the roles.

        The runner gives each an AdamW with :meth:`auxiliary_settings` and its LR schedule,
        prepares it like a role, and adds it to the bundle as a trainable role of that name: the
        trainer then clips, steps, checkpoints and resumes it without knowing what it is.
        """
        return {}

    @classmethod
    def describe(cls, cfg: RunConfig) -> list[str]:
        """Lines for ``--dry-run``: what this method will do with the config."""
        return []

    # --- the contract -----------------------------------------------------------------
    @abstractmethod
    def train_step(self, batch: dict[str, Any], iteration: int) -> tuple[dict[str, torch.Tensor], dict]:
        """One micro-batch: ``loss_map`` holds ``total_loss``; ``outputs`` are for logging only."""

    @contextlib.contextmanager
    def backward_with(self, backward: Callable[[torch.Tensor], None]) -> Iterator[None]:
        """While active, :meth:`backward_now` runs ``backward`` (the trainer's: loss scaling, 1/G, outside autocast)."""
        self._backward = backward
        try:
            yield
        finally:
            self._backward = None

    def backward_now(self, loss: torch.Tensor) -> torch.Tensor:
        """Backpropagate ``loss`` now and return it detached, for ``total_loss``'s value (the trainer's backward
        of ``total_loss`` then covers the rest of the step).

        For a step that builds two graphs in turn (DMD2: the student's pseudo-loss, then the critic's
        loss on the detached sample): the first graph's saved activations are freed before the second's
        exist, so the step's peak memory is that of its larger graph, not their sum -- on the CPU, also
        the allocator growing and trimming its heap (page faults) every such step. The gradients are
        those of one combined backward when the two graphs share no trainable parameter. Outside the
        trainer (a direct ``train_step`` call) nothing runs and ``loss`` comes back unchanged.
        """
        if self._backward is None:
            return loss
        self._backward(loss)
        return loss.detach()

    def updating_roles(self, iteration: int) -> list[str]:
        """Trainable roles whose optimizer steps at ``iteration`` (default: all, every time)."""
        return list(self.bundle.trainable)

    def _units(self, roles) -> list[tuple[str, torch.nn.Module, torch.optim.Optimizer, object]]:
        return [u for r in roles for u in self.bundle[r].units()]

    def get_optimizers(self, iteration: int) -> list[torch.optim.Optimizer]:
        """Every optimizer of the roles updating now (each module of a role has its own)."""
        return [opt for _, _, opt, _ in self._units(self.updating_roles(iteration))]

    def get_lr_schedulers(self, iteration: int) -> list:
        return [sched for _, _, _, sched in self._units(self.updating_roles(iteration))]

    def optimizers_schedulers_step(self, iteration: int) -> None:
        for opt, sched in zip(self.get_optimizers(iteration), self.get_lr_schedulers(iteration)):
            opt.step()
            sched.step()

    def optimizers_zero_grad(self, iteration: int) -> None:
        # Every trainable module, stepped or not: no gradient may leak into a later iteration. What
        # zero_grad(set_to_none=True) does, without its per-call wrappers (accelerate inspects the
        # optimizer's signature, torch's is dynamo-disabled and profiled): ~35 us per optimizer on a CPU.
        for opt in self.optimizer_dict.values():
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = None

    def grad_clip_targets(self, iteration: int) -> list[tuple[str, torch.nn.Module, float | None]]:
        """(unit, prepared module, max_norm) of each module stepping now; the trainer clips them."""
        roles = self.updating_roles(iteration)
        return [(unit, module, self.bundle[r].max_grad_norm) for r in roles for unit, module, _, _ in self._units([r])]

    @property
    def model_dict(self) -> dict[str, torch.nn.Module]:
        return {unit: module for unit, module, _, _ in self._units(self.bundle.trainable)}

    @property
    def optimizer_dict(self) -> dict[str, torch.optim.Optimizer]:
        return {unit: opt for unit, _, opt, _ in self._units(self.bundle.trainable)}

    @property
    def scheduler_dict(self) -> dict:
        return {unit: sched for unit, _, _, sched in self._units(self.bundle.trainable)}

    # --- export and state -------------------------------------------------------------
    def export_role(self) -> RoleHandle:
        """The role whose weights are the product of the run (:attr:`product_role`)."""
        return self.bundle[self.product_role]

    def export_schedule(self):
        """The few-step schedule to export with the student, or None to keep the source scheduler."""
        return None

    def state_dict(self) -> dict:
        return {"shared_gen": self.shared_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.shared_gen.set_state(state["shared_gen"])

    # --- helpers for subclasses ---------------------------------------------------------
    def sample_noise(self, batch: dict) -> SampleNoise:
        """This batch's per-sample random streams (see :class:`SampleNoise`)."""
        return SampleNoise(self.seed, batch["sample_keys"], self.device)

    def shared_randint(self, high: int) -> int:
        """One draw that every rank makes identically."""
        return int(torch.randint(high, (1,), generator=self.shared_gen))

    def negative(self, cond: Conditioning) -> Conditioning:
        """The unconditional variant of ``cond`` (the family decides what the negative replaces)."""
        if self.neg_cond is None:
            raise ValueError(f"method {self.name!r} needs a negative-prompt embedding but none was loaded")
        return self.adapter.negative(cond, self.neg_cond)
