"""Train the small ``AutoencoderKLWan`` that maps 32x32 digits to [z_dim, 1, 4, 4] latents.

A random Wan VAE does not decode to digits, so this one is trained (MSE + a small
KL term) on the training split only. The class and config layout stay stock, so
``WanPipeline`` loads it unchanged; ``latents_mean`` / ``latents_std`` are set from
the trained posterior means so the pipeline's (de)normalisation matches training.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

VAE_CONFIG = dict(
    base_dim=16,
    z_dim=16,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
)


def make_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    cfg = dict(VAE_CONFIG, **overrides)
    cfg["latents_mean"] = [0.0] * cfg["z_dim"]
    cfg["latents_std"] = [1.0] * cfg["z_dim"]
    return AutoencoderKLWan(**cfg)


@torch.no_grad()
def encode_mean(vae, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Posterior means (un-normalised latents) of [N, 3, 1, H, W] images."""
    vae.eval()
    out = [vae.encode(images[i : i + batch_size]).latent_dist.mode() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    vae.eval()
    out = [vae.decode(latents[i : i + batch_size]).sample for i in range(0, len(latents), batch_size)]
    return torch.cat(out).clamp(-1, 1)


def train_vae(
    images: torch.Tensor,
    *,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 3e-3,
    kl_weight: float = 1e-6,
    l1_weight: float = 0.5,
    posterior_noise: float = 1.0,
    seed: int = 0,
    log_every: int = 100,
    config: dict | None = None,
    init=None,
):
    """Train a fresh VAE on ``images`` [N, 3, F, H, W]; returns it with latents_mean/std filled in.

    ``init``: a trained VAE to fine-tune instead (``config`` is then ignored): the two-digit clips'
    VAE starts from the one-digit one.

    ``config``: overrides of ``VAE_CONFIG`` (the video model's narrower one); ``posterior_noise``: the
    scale of the sampled posterior noise (0: a plain autoencoder on the posterior mean, which is what
    preprocessing encodes and what the pipeline decodes).
    """
    vae = make_vae(seed, **(config or {})) if init is None else init
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    vae.train()
    for step in range(1, steps + 1):
        x = images[torch.randint(len(images), (batch_size,), generator=gen)]
        dist = vae.encode(x).latent_dist
        z = dist.mean + posterior_noise * dist.std * torch.randn(dist.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = 0.5 * (dist.mean.pow(2) + dist.var - 1 - dist.logvar).mean()
        loss = mse + F.l1_loss(rec, x) * l1_weight + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps):
            print(
                f"vae step {step}/{steps} mse {mse.item():.4f} kl {kl.item():.2f} ({time.perf_counter() - start:.0f}s)"
            )
    vae.eval()
    lat = encode_mean(vae, images)
    mean = lat.mean(dim=(0, 2, 3, 4))
    std = lat.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(
        latents_mean=[round(float(v), 6) for v in mean], latents_std=[round(float(v), 6) for v in std]
    )
    return vae
