"""DMD2's GAN head: a small discriminator on a frozen network's hidden states, and its non-saturating losses.

The features are the frozen teacher's hidden states after chosen transformer blocks
(``ModelAdapter.features``), ``[B, tokens, width]`` each. One head per tapped block:
LayerNorm, a two-layer MLP to a logit per token, the mean over tokens; the logits are
``[B, blocks]``. (FastGen unpatchifies the tokens and runs a conv head; a per-token MLP
averaged over tokens needs no knowledge of the latent layout, so it serves every family.)

Losses (DMD2 / FastGen), on noised real and generated latents at the same timestep and noise:
generator ``softplus(-D(fake))``; discriminator ``softplus(D(fake)) + softplus(-D(real))``;
approximate R1 (FastGen): ``mean((D(real) - D(real perturbed))^2)``, the head's output change
under a small perturbation of the real input -- a finite-difference stand-in for the gradient
penalty that needs no double backward through the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FeatureDiscriminator(torch.nn.Module):
    """One head per tapped block: LayerNorm -> Linear -> SiLU -> Linear -> a logit per token, averaged."""

    def __init__(self, width: int, num_blocks: int, hidden: int = 256):
        super().__init__()
        self.heads = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.LayerNorm(width),
                torch.nn.Linear(width, hidden),
                torch.nn.SiLU(),
                torch.nn.Linear(hidden, 1),
            )
            for _ in range(num_blocks)
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``features``: one ``[B, tokens, width]`` tensor per head -> logits ``[B, heads]`` (float32)."""
        if len(features) != len(self.heads):
            raise ValueError(f"{len(features)} feature maps for {len(self.heads)} heads")
        logits = [head(f.float()).squeeze(-1).float().mean(dim=1) for head, f in zip(self.heads, features)]
        return torch.stack(logits, dim=1)


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``mean(softplus(-D(fake)))``."""
    return F.softplus(-fake_logits.float()).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean(softplus(D(fake))) + mean(softplus(-D(real)))``; the generated sample must come in detached."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def approximate_r1(real_logits: torch.Tensor, perturbed_logits: torch.Tensor) -> torch.Tensor:
    """FastGen's approximate R1: ``mean((D(x) - D(x + sigma eps))^2)``, gradient into both evaluations' head."""
    return F.mse_loss(real_logits.float(), perturbed_logits.float())
