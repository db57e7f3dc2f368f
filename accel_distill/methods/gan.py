"""A GAN term on the frozen teacher's features for a distillation method (DMD2's GAN head).

The discriminator is a method-owned auxiliary network (``auxiliary_names`` / ``build_auxiliary``):
the runner prepares, clips, steps, checkpoints and resumes it like any trainable role. Real
samples are data latents; generated ones the student's x0. Both are noised at the same
timestep with the same noise, the teacher's hidden states after the configured blocks
are the discriminator's input (``ModelAdapter.features``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from accel_distill.config.schema import RunConfig
from accel_distill.config.validate import fail
from accel_distill.discriminator import FeatureDiscriminator, approximate_r1, discriminator_loss, generator_loss
from accel_distill.errors import ConfigError
from accel_distill.families.base import Conditioning, ModelAdapter
from accel_distill.methods.base import SampleNoise, derived_seed
from accel_distill.roles import ModelBundle

DISCRIMINATOR = "discriminator"  # the auxiliary network's name: its checkpoint files, logs, grad norm
_INIT_STREAM = 2  # seed stream of its initialisation (the same weights on every rank)


def check_feature_blocks(cfg: RunConfig, key: str, blocks: Sequence[int], count: int | None, role: str) -> None:
    """Blocks are distinct, 0-based and below the ``role`` network's block count (when known)."""
    if len(set(blocks)) != len(blocks):
        fail(cfg.source, key, f"lists a block twice: {list(blocks)}")
    for b in blocks:
        if b < 0 or (count is not None and b >= count):
            where = f"the {role} has {count} blocks (0..{count - 1})" if count is not None else "blocks are 0-based"
            raise ConfigError(f"{cfg.source}: {key}: block {b} is out of range: {where}")


def text_only_file(data_path) -> str | None:
    """The first file of a local ``data_path`` without latents (footers only), None when every one has
    them; Hub data and paths that do not resolve are left to the stream, which checks them when it opens."""
    from accel_distill.data.schema import LATENT_BYTES
    from accel_distill.data.sources import is_hub_reference, resolve_data_files
    from accel_distill.errors import DataError

    paths = [data_path] if isinstance(data_path, str) else list(data_path)
    if any(is_hub_reference(p) for p in paths):
        return None
    try:
        files = resolve_data_files(paths)
    except DataError:
        return None
    for f in files:
        with f.parquet() as pf:
            if LATENT_BYTES not in pf.schema_arrow.names:
                return str(f)
    return None


def pick(cond: Conditioning, copies: int) -> Conditioning:
    """``cond`` repeated ``copies`` times along the batch (one batched teacher forward)."""
    return {k: torch.cat([v] * copies) for k, v in cond.items()}


class GANHead:
    """Generator and discriminator terms of a method's GAN head on the ``teacher`` role's features."""

    def __init__(
        self,
        bundle: ModelBundle,
        adapter: ModelAdapter,
        blocks: Sequence[int],
        *,
        r1_weight: float,
        r1_sigma: float,
        teacher: str = "teacher",
    ):
        self.bundle, self.adapter, self.blocks = bundle, adapter, list(blocks)
        self.r1_weight, self.r1_sigma, self.teacher = r1_weight, r1_sigma, teacher

    def build(self, cfg: RunConfig, key: str, hidden: int, seed: int) -> FeatureDiscriminator:
        """The discriminator, sized from the loaded teacher (its blocks checked against the real model),
        initialised identically on every rank without touching the global RNG."""
        module = self.bundle[self.teacher].transformer
        check_feature_blocks(cfg, key, self.blocks, len(self.adapter.feature_blocks(module)), self.teacher)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(seed, _INIT_STREAM))
            return FeatureDiscriminator(self.adapter.feature_width(module), len(self.blocks), hidden)

    @property
    def discriminator(self) -> torch.nn.Module:
        return self.bundle[DISCRIMINATOR].modules[DISCRIMINATOR]

    def logits(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """D(teacher features at x_t): gradients reach x_t and the head, never the frozen teacher."""
        return self.discriminator(self.adapter.features(self.bundle[self.teacher], x_t, t, cond, self.blocks))

    def generator_loss(
        self, x0: torch.Tensor, cond: Conditioning, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """``softplus(-D(f(noised x0)))`` with the student's graph live: its gradient trains the student."""
        return generator_loss(self.logits(self.adapter.noise.add_noise(x0, noise, t), t, cond))

    def discriminator_loss(
        self,
        fake_x0: torch.Tensor,
        real_x0: torch.Tensor,
        cond: Conditioning,
        t: torch.Tensor,
        noise: torch.Tensor,
        rng: SampleNoise,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``softplus(D(fake)) + softplus(-D(real))`` (+ ``r1_weight`` x approximate R1) at the same t and noise.

        The generated sample is detached and the teacher runs without gradient: only the head trains.
        Real, generated (and perturbed real) latents go through the teacher and the head as one batch.
        """
        noise_fn = self.adapter.noise
        with torch.no_grad():
            x_real = noise_fn.add_noise(real_x0, noise, t)
            xs = [x_real, noise_fn.add_noise(fake_x0.detach(), noise, t)]
            if self.r1_weight > 0:
                xs.append(x_real + self.r1_sigma * rng.randn_like(x_real))
            copies = len(xs)
            feats = self.adapter.features(
                self.bundle[self.teacher], torch.cat(xs), t.repeat(copies), pick(cond, copies), self.blocks
            )
        logits = self.discriminator(feats).chunk(copies)
        loss = discriminator_loss(logits[0], logits[1])
        parts = {"gan_discriminator_loss": loss.detach()}
        if self.r1_weight > 0:
            r1 = approximate_r1(logits[0], logits[2])
            parts["gan_r1"] = r1.detach()
            loss = loss + self.r1_weight * r1
        return loss, parts
