"""DMD2: distribution-matching distillation of a teacher into a few-step student.

Roles: ``student`` (trainable generator), ``teacher`` (frozen real score),
``critic`` (trainable fake score). Every iteration trains the critic with
flow matching on detached student samples; every ``generator_update_interval``
iterations the student also takes the normalised DMD gradient

    grad = (x0_fake - x0_real) / mean(|x0_student - x0_real|)   (per sample)

through the pseudo-loss 0.5 * ||x0 - sg(x0 - grad)||^2. The teacher's x0 uses
classifier-free guidance in diffusers' convention,
``v = v_neg + g (v_cond - v_neg)`` (g = 1: no guidance, one forward). FastVideo
writes ``v_cond + g' (v_cond - v_neg)``, so its g' = our g - 1.
On student-update iterations the critic reuses that same (detached) student
sample instead of running a second rollout.

GAN head (``gan_feature_blocks``, DMD2 paper sec. 4.3, FastGen): a discriminator on the
frozen teacher's hidden states (``methods/gan.py``). On student-update iterations the
student adds ``gan_generator_weight * softplus(-D(f(noised x0)))``; the discriminator
trains on the critic-only iterations (DMD2's two time-scale update: it steps with the
fake score, never while the student's term reaches it) on noised data latents against
noised student samples at the same timestep and noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from accel_distill.config.schema import RunConfig
from accel_distill.config.validate import check_range, fail
from accel_distill.families.base import Conditioning, cond_batch_size
from accel_distill.methods.base import DistillMethod, SampleNoise, describe_schedule, student_schedule
from accel_distill.methods.gan import DISCRIMINATOR, GANHead, check_feature_blocks, text_only_file
from accel_distill.registry import FAMILIES, register_method
from accel_distill.schedule import StockSchedule


@dataclass
class DMD2Config:
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "attn_kind": "removed: attention is chosen by training.attention_backend (or roles.<role>.attention_backend)",
    }

    # "simulate": backward simulation from pure noise (train == inference, data-free);
    # "data": the student denoises noised data latents at one of its steps.
    rollout_mode: Literal["simulate", "data"] = "simulate"
    # The student's timesteps (a trailing 0 marks the clean end and is dropped).
    dmd_denoising_steps: list[float] = field(default_factory=lambda: [1000.0, 757.0, 522.0])
    # Critic every iteration; student when iteration % interval == 0.
    generator_update_interval: int = 5
    real_score_guidance_scale: float = 3.5
    # Score/critic timesteps: u ~ U[min, max] per sample, then the family's flow shift
    # (FastVideo's behaviour; false keeps them uniform, as DMD2 -- better on the digits demo).
    min_timestep_ratio: float = 0.02
    max_timestep_ratio: float = 0.98
    shift_score_timesteps: bool = True
    # How far (in timestep units) the exported scheduler may miss a requested step.
    step_tolerance: float = 1.0
    # GAN head: a discriminator on the frozen teacher's hidden states after these blocks (0-based;
    # empty: no GAN). FastGen taps Wan 1.3B at [15, 22, 29] (of 30), 14B at [21, 30, 39]. Needs data latents.
    gan_feature_blocks: list[int] = field(default_factory=list)
    # Weight of softplus(-D(fake)) in the student's loss: FastGen 0.001 by default, 0.03 for Wan.
    gan_generator_weight: float = 0.001
    # Approximate R1 (FastGen): weight x mean((D(x_real) - D(x_real + sigma eps))^2); 0 turns it off.
    gan_r1_weight: float = 0.0
    gan_r1_sigma: float = 0.1
    # Hidden width of each discriminator head's MLP.
    gan_head_width: int = 256


def dmd_gradient(x0: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor) -> torch.Tensor:
    """Normalised DMD direction (fake - real) / mean|x0 - real|, per sample, NaN-safe."""
    dims = tuple(range(1, x0.dim()))
    scale = (x0.float() - real_x0.float()).abs().mean(dim=dims, keepdim=True)
    # a sample already equal to the teacher's x0 (scale 0) gets no push, not +-inf
    return torch.nan_to_num(torch.where(scale > 0, (fake_x0.float() - real_x0.float()) / scale, 0.0))


def dmd_pseudo_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mean((x0 - sg(x0 - grad))^2): its gradient w.r.t. x0 is grad / numel."""
    x0 = x0.float()
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def critic_denoising_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Denoising score matching of the fake score on (detached) student samples, in its native prediction
    (flow matching for rectified-flow families: target noise - x0)."""
    return F.mse_loss(pred.float(), target.float())


@register_method("dmd2")
class DMD2Method(DistillMethod):
    """Distribution matching distillation (Yin et al. 2024) with backward simulation."""

    config_class = DMD2Config
    required_roles = ("student", "teacher", "critic")
    role_trainable = {"student": True, "teacher": False, "critic": True}
    required_capabilities = frozenset({"native_prediction", "x0_prediction", "cfg"})

    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        c, src = cfg.method_config, cfg.source
        check_range(src, "method_config.generator_update_interval", c.generator_update_interval, 1)
        check_range(src, "method_config.real_score_guidance_scale", c.real_score_guidance_scale, 0.0)
        check_range(src, "method_config.min_timestep_ratio", c.min_timestep_ratio, 0.0, 1.0)
        check_range(src, "method_config.max_timestep_ratio", c.max_timestep_ratio, 0.0, 1.0)
        check_range(src, "method_config.step_tolerance", c.step_tolerance, 0.0)
        if c.gan_feature_blocks:
            cls.validate_gan(cfg)
        if c.min_timestep_ratio >= c.max_timestep_ratio:
            fail(
                src,
                "method_config.min_timestep_ratio",
                f"must be below max_timestep_ratio ({c.min_timestep_ratio} >= {c.max_timestep_ratio})",
            )
        cls.schedule_from(cfg)

    @classmethod
    def validate_gan(cls, cfg: RunConfig) -> None:
        c, src = cfg.method_config, cfg.source
        key = "method_config.gan_feature_blocks"
        count = FAMILIES[cfg.recipe.family].feature_block_count(cfg, "teacher")
        check_feature_blocks(cfg, key, c.gan_feature_blocks, count, "teacher")
        if c.generator_update_interval < 2:
            fail(
                src,
                key,
                "the discriminator trains on the critic-only iterations, which generator_update_interval 1 "
                "leaves none of; set method_config.generator_update_interval to 2 or more",
            )
        text_only = text_only_file(cfg.training.data_path)
        if text_only is not None:
            fail(
                src,
                key,
                f"the GAN head's real samples are data latents, but {text_only} holds text only: a data-free "
                f"({c.rollout_mode}) rollout has no real samples; train on data with latents (preprocess videos, "
                "or teacher samples from python -m accel_distill.generate)",
            )
        check_range(src, "method_config.gan_generator_weight", c.gan_generator_weight, 0.0)
        check_range(src, "method_config.gan_r1_weight", c.gan_r1_weight, 0.0)
        check_range(src, "method_config.gan_r1_sigma", c.gan_r1_sigma, 0.0)
        check_range(src, "method_config.gan_head_width", c.gan_head_width, 1)

    @classmethod
    def schedule_from(cls, cfg: RunConfig) -> StockSchedule:
        return student_schedule(cfg, "dmd_denoising_steps", cfg.method_config.step_tolerance)

    @classmethod
    def needs_latents(cls, cfg: RunConfig) -> bool:
        # the GAN head's real samples are data latents, whatever the rollout
        return cfg.method_config.rollout_mode == "data" or bool(cfg.method_config.gan_feature_blocks)

    @classmethod
    def optimizer_steps(cls, cfg: RunConfig, role: str) -> int:
        student_steps = -(-cfg.training.max_train_steps // cfg.method_config.generator_update_interval)
        if role == "student":  # iterations 0, k, 2k, ... below max_train_steps
            return student_steps
        if role == DISCRIMINATOR:  # the others
            return cfg.training.max_train_steps - student_steps
        return cfg.training.max_train_steps

    @classmethod
    def auxiliary_names(cls, cfg: RunConfig) -> tuple[str, ...]:
        return (DISCRIMINATOR,) if cfg.method_config.gan_feature_blocks else ()

    @classmethod
    def auxiliary_settings(cls, cfg: RunConfig, name: str) -> dict:
        """The discriminator trains alongside the fake score, with its optimizer settings."""
        return cfg.role_defaults("critic")

    @classmethod
    def needs_negative_conditioning(cls, cfg: RunConfig) -> bool:
        return cfg.method_config.real_score_guidance_scale != 1.0

    @classmethod
    def describe(cls, cfg: RunConfig) -> list[str]:
        c = cfg.method_config
        lines = [
            f"dmd2: {c.rollout_mode} rollout, {describe_schedule(cls.schedule_from(cfg))}",
            f"dmd2: critic every iteration, student every {c.generator_update_interval}, "
            f"teacher CFG {c.real_score_guidance_scale} (v_neg + g (v_cond - v_neg))",
        ]
        if c.gan_feature_blocks:
            lines.append(
                f"dmd2: GAN head on teacher blocks {c.gan_feature_blocks}, generator weight {c.gan_generator_weight}, "
                f"approximate R1 {c.gan_r1_weight}; discriminator on the critic-only iterations (critic's optimizer)"
            )
        return lines

    def __init__(self, bundle, adapter, cfg, **kwargs):
        super().__init__(bundle, adapter, cfg, **kwargs)
        self.schedule = self.schedule_from(cfg)
        self.timesteps = torch.tensor(self.schedule.timesteps, dtype=torch.float32, device=self.device)
        self.sampler_kind = cfg.pipeline_config.sampler_kind
        c = self.config
        self.gan = (
            GANHead(bundle, adapter, c.gan_feature_blocks, r1_weight=c.gan_r1_weight, r1_sigma=c.gan_r1_sigma)
            if c.gan_feature_blocks
            else None
        )

    def build_auxiliary(self) -> dict[str, torch.nn.Module]:
        if self.gan is None:
            return {}
        key = "method_config.gan_feature_blocks"
        return {DISCRIMINATOR: self.gan.build(self.cfg, key, self.config.gan_head_width, self.seed)}

    # --- schedule ---------------------------------------------------------------------
    def updates_student(self, iteration: int) -> bool:
        return iteration % self.config.generator_update_interval == 0

    def updating_roles(self, iteration: int) -> list[str]:
        if self.updates_student(iteration):
            return ["student", "critic"]
        return ["critic", DISCRIMINATOR] if self.gan is not None else ["critic"]

    def export_schedule(self) -> StockSchedule:
        return self.schedule

    # --- pieces -----------------------------------------------------------------------
    def score_timesteps(self, rng: SampleNoise) -> torch.Tensor:
        """Per-sample timesteps for the score / critic evaluations."""
        c = self.config
        u = c.min_timestep_ratio + (c.max_timestep_ratio - c.min_timestep_ratio) * rng.rand()
        if c.shift_score_timesteps:
            return self.noise.timesteps_from_uniform(u)
        return u * self.noise.num_train_timesteps

    def next_sample(
        self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, rng: SampleNoise
    ) -> torch.Tensor:
        """Move from t to t_next as the exported sampler will (sde: re-noise x0; ode: a deterministic step)."""
        return self.noise.step(x_t, pred, t, t_next, rng.randn_like, self.sampler_kind)

    def rollout_start(
        self, batch: dict, cond: Conditioning, rng: SampleNoise
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(x_t, t, exit index): where the student's graded step starts."""
        student, n_steps = self.bundle["student"], len(self.timesteps)
        b = cond_batch_size(cond)
        if self.config.rollout_mode == "data":
            x0 = self.adapter.normalize_latents(batch["latents"])
            t = self.timesteps[rng.randint(n_steps)]
            return self.noise.add_noise(x0, rng.randn_like(x0), t), t, -1
        shape = tuple(batch["latents"].shape[1:]) if "latents" in batch else self.latent_shape
        x = rng.randn(shape)
        exit_idx = self.shared_randint(n_steps)
        with torch.no_grad():  # only the steps this exit index needs, never the whole chain
            for i in range(exit_idx):
                t, t_next = self.timesteps[i].expand(b), self.timesteps[i + 1].expand(b)
                x = self.next_sample(x, self.adapter.predict(student, x, t, cond), t, t_next, rng)
        return x, self.timesteps[exit_idx].expand(b), exit_idx

    def student_x0(self, batch: dict, cond: Conditioning, rng: SampleNoise, *, grad: bool) -> tuple[torch.Tensor, dict]:
        x_t, t, exit_idx = self.rollout_start(batch, cond, rng)
        with torch.set_grad_enabled(grad):
            x0 = self.adapter.predict_x0(self.bundle["student"], x_t, t, cond)
        return x0, {"student_timesteps": t, "exit_index": exit_idx}

    def dmd_loss(self, x0: torch.Tensor, cond: Conditioning, rng: SampleNoise) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            t = self.score_timesteps(rng)
            x_t = self.noise.add_noise(x0.detach(), rng.randn_like(x0), t)
            fake_x0 = self.adapter.predict_x0(self.bundle["critic"], x_t, t, cond)
            g = self.config.real_score_guidance_scale
            neg = self.negative(cond) if g != 1.0 else None
            real_x0 = self.adapter.predict_x0_cfg(self.bundle["teacher"], x_t, t, cond, neg, g)
            grad = dmd_gradient(x0.detach(), fake_x0, real_x0)
        return dmd_pseudo_loss(x0, grad), {"dmd_timesteps": t}

    def critic_loss(self, x0: torch.Tensor, cond: Conditioning, rng: SampleNoise) -> torch.Tensor:
        x0 = x0.detach()
        t = self.score_timesteps(rng)
        noise = rng.randn_like(x0)
        pred = self.adapter.predict(self.bundle["critic"], self.noise.add_noise(x0, noise, t), t, cond)
        return critic_denoising_loss(pred, self.noise.target(x0, noise, t))

    # --- the step ---------------------------------------------------------------------
    def train_step(self, batch: dict, iteration: int) -> tuple[dict[str, torch.Tensor], dict]:
        cond, rng = self.adapter.conditioning(batch), self.sample_noise(batch)
        update_student = self.updates_student(iteration)
        x0, outputs = self.student_x0(batch, cond, rng, grad=update_student)
        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.device)
        if update_student:
            dmd, extra = self.dmd_loss(x0, cond, rng)
            outputs.update(extra)
            losses["dmd_loss"] = dmd.detach()
            total = total + dmd
            if self.gan is not None:
                gen = self.gan.generator_loss(x0, cond, self.score_timesteps(rng), rng.randn_like(x0))
                losses["gan_generator_loss"] = gen.detach()
                total = total + self.config.gan_generator_weight * gen
            # the student's graph is backpropagated (and its activations freed) before the critic's is built
            total = self.backward_now(total)
        critic = self.critic_loss(x0, cond, rng)  # reuses this iteration's student sample
        losses["critic_loss"] = critic.detach()
        if self.gan is not None and not update_student:
            real = self.adapter.normalize_latents(batch["latents"])
            disc, parts = self.gan.discriminator_loss(
                x0, real, cond, self.score_timesteps(rng), rng.randn_like(real), rng
            )
            losses.update(parts)
            total = total + disc
        losses["total_loss"] = total + critic
        outputs["student_x0"] = x0.detach()
        return losses, outputs
