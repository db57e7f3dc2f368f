"""Precision names -> torch dtypes, and which half precision a device computes in.

One map for every place that turns a precision name into a dtype: role weights
(``roles.<role>.precision``), the mixed-precision setting (``training.mixed_precision``,
whose ``"no"`` means fp32), and the preprocessing ``--dtype`` / ``--store-dtype``.
"""

from __future__ import annotations

import os

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "no": torch.float32,  # accelerate's name for "no mixed precision"
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
MIXED_PRECISIONS = ("no", "bf16", "fp16")
LAUNCH_ENV = "ACCELERATE_MIXED_PRECISION"


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a precision name (``fp32``/``no``, ``bf16``, ``fp16``)."""
    return DTYPES[name]


def half_dtype_for(device: torch.device) -> torch.dtype:
    """The dtype big frozen encoders run in on ``device``: bf16 on any accelerator, fp32 on the CPU.

    (CPU bf16 matmuls are slow on most hosts; every accelerator torch supports computes bf16.)
    """
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def has_accelerator() -> bool:
    """Whether torch sees any accelerator (CUDA, ROCm, MPS, XPU, ...), not only CUDA."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def launch_mixed_precision() -> str | None:
    """The launcher's mixed precision (``accelerate launch --mixed_precision`` / its config file), if any.

    accelerate writes ``no`` when nothing was asked for, so ``no`` cannot be told apart
    from "unset" and counts as unset.
    """
    value = os.environ.get(LAUNCH_ENV, "").strip().lower()
    return None if value in ("", "no") else value
