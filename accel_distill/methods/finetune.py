"""Flow-matching supervised finetuning of the student (one trainable role)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from accel_distill.config.schema import RunConfig
from accel_distill.config.validate import check_range
from accel_distill.families.base import cond_where
from accel_distill.methods.base import DistillMethod, SampleNoise
from accel_distill.registry import register_method


@dataclass
class FinetuneConfig:
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "loss": "removed: the loss is always flow matching; method_config.pred_type picks its target (flow or x0)",
    }

    # "uniform": u ~ U(0, 1); "logit_normal": u = sigmoid(N(logit_mean, logit_std)) (SD3).
    # Either is then shifted with the family's flow_shift, as at inference.
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # Probability of replacing a sample's text embedding with the negative one (enables CFG).
    cfg_dropout_rate: float = 0.1
    # Space of the regression target: the network's native prediction ("flow": noise - x0 for
    # rectified-flow families) or the clean latent x0.
    pred_type: Literal["flow", "x0"] = "flow"


@register_method("finetune")
class FinetuneMethod(DistillMethod):
    """Rectified-flow SFT: x_t = (1-s) x0 + s eps, regress v = eps - x0 (or x0)."""

    config_class = FinetuneConfig
    required_roles = ("student",)
    role_trainable = {"student": True}
    required_capabilities = frozenset({"native_prediction"})

    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        c = cfg.method_config
        check_range(cfg.source, "method_config.cfg_dropout_rate", c.cfg_dropout_rate, 0.0, 1.0)
        check_range(cfg.source, "method_config.logit_std", c.logit_std, 1e-6)

    @classmethod
    def needs_negative_conditioning(cls, cfg: RunConfig) -> bool:
        return cfg.method_config.cfg_dropout_rate > 0

    @classmethod
    def describe(cls, cfg: RunConfig) -> list[str]:
        c = cfg.method_config
        return [
            f"finetune: {c.timestep_sampling} timesteps with the family's flow shift, "
            f"{c.pred_type} loss, CFG dropout {c.cfg_dropout_rate}"
        ]

    def sample_timesteps(self, noise: SampleNoise) -> torch.Tensor:
        c = self.config
        if c.timestep_sampling == "logit_normal":
            u = torch.sigmoid(c.logit_mean + c.logit_std * noise.randn(()))
        else:
            u = noise.rand()
        return self.noise.timesteps_from_uniform(u)

    def train_step(self, batch: dict, iteration: int) -> tuple[dict[str, torch.Tensor], dict]:
        student = self.bundle["student"]
        x0 = self.adapter.normalize_latents(batch["latents"])
        cond = self.adapter.conditioning(batch)
        rng = self.sample_noise(batch)
        if self.config.cfg_dropout_rate > 0:
            drop = rng.rand() < self.config.cfg_dropout_rate
            cond = cond_where(drop, self.negative(cond), cond)
        t = self.sample_timesteps(rng)
        noise = rng.randn_like(x0)
        x_t = self.noise.add_noise(x0, noise, t)
        pred = self.adapter.predict(student, x_t, t, cond)
        if self.config.pred_type == "flow":
            loss = F.mse_loss(pred, self.noise.target(x0, noise, t))
        else:
            loss = F.mse_loss(self.noise.to_x0(pred, x_t, t), x0)
        return {"total_loss": loss, "flow_loss": loss.detach()}, {"timesteps": t}
