"""The preprocessing encoder: the family's own VAE and text encoder (``Family.media_encoder``).

What the encoders store is defined by :class:`accel_distill.families.base.MediaEncoder`:
latents are the VAE posterior's *mode*, **un-normalised** (what FastVideo stores;
training normalises with the VAE's ``latents_mean`` / ``latents_std``), which
makes the output deterministic on any machine / rank; text embeddings are the
last hidden state of the real tokens only, ``[L, D]``, which readers zero-pad.
"""

from __future__ import annotations

import os

import torch

from accel_distill.errors import ConfigError
from accel_distill.families.base import MediaEncoder
from accel_distill.precision import dtype_of, half_dtype_for


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on an accelerator, fp32 on the CPU; else the named dtype."""
    return half_dtype_for(device) if name == "auto" else dtype_of(name)


def make_encoder(
    family: str, source: str, *, dtype: torch.dtype, device: torch.device, revision: str | None = None
) -> MediaEncoder:
    """The preprocessing encoder of a registered family; ConfigError for an unknown one or a missing folder."""
    from accel_distill.config.validate import looks_local
    from accel_distill.registry import FAMILIES, load_builtins

    load_builtins()
    if family not in FAMILIES:
        raise ConfigError(f"--family {family!r}: unknown family (known: {', '.join(sorted(FAMILIES))})")
    if looks_local(source) and not os.path.isdir(os.path.expanduser(source)):
        raise ConfigError(f"--model {source}: no such folder (give a diffusers folder or a Hub id)")
    return FAMILIES[family].media_encoder(source, dtype=dtype, device=device, revision=revision)
