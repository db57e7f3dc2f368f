"""scikit-learn's bundled handwritten digits as 1-frame [-1, 1] "videos", split by seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16  # 8x8 digits upscaled to 16x16 -> 2x2 latents with the Wan VAE's spatial factor 8 (CPU-cheap)


@dataclass
class DigitSplit:
    images: torch.Tensor  # [N, 3, 1, S, S] in [-1, 1]
    labels: torch.Tensor  # [N] int64
    indices: np.ndarray  # rows of sklearn's load_digits


def upscale(raw: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """[N, 64] digit pixels (0..16) -> [N, 3, 1, size, size] in [-1, 1] (bilinear upscaling, grey RGB)."""
    x = torch.as_tensor(np.asarray(raw, dtype=np.float32)).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return (x * 2 - 1).repeat(1, 3, 1, 1).unsqueeze(2)


def load_split(split: str = "train", *, seed: int = 0, held_out: float = 0.2, size: int = IMAGE_SIZE) -> DigitSplit:
    """``split`` ("train", "held_out" or "all") of load_digits; the permutation is fixed by ``seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target)
    perm = np.random.default_rng(seed).permutation(n)
    n_held = int(round(n * held_out))
    idx = {"train": perm[n_held:], "held_out": perm[:n_held], "all": np.arange(n)}[split]
    idx = np.sort(idx)
    return DigitSplit(upscale(digits.data[idx], size), torch.as_tensor(digits.target[idx], dtype=torch.long), idx)


def to_uint8_gray(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """Images in [-1, 1] [N, 3, (1,) H, W] torch, or pipeline np output [N, F, H, W, 3] in [0, 1] -> [N, H, W] uint8."""
    if isinstance(frames, np.ndarray):  # WanPipeline output_type="np": [N, F, H, W, C] in [0, 1]
        g = frames[:, 0].mean(-1)
    else:
        t = frames.float()
        if t.dim() == 5:
            t = t[:, :, 0]
        g = ((t.mean(1) + 1) / 2).clamp(0, 1).numpy()
    return (np.clip(g, 0, 1) * 255).round().astype(np.uint8)
