"""scikit-learn's bundled handwritten digits as 1-frame [-1, 1] "videos", split by seed.

Pixels go through the preprocessing code path users' images take
(``accel_distill.preprocess.media``): 8-bit RGB, bilinear scale-to-cover, then
``[-1, 1]``. So the VAE trains on exactly the pixels that ``preprocess videos``
later encodes from the PNG files ``write_split_images`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from accel_distill.digits import caption
from accel_distill.preprocess.media import resize_center_crop, to_model_input

IMAGE_SIZE = 16  # 8x8 digits upscaled to 16x16 -> 2x2 latents with the Wan VAE's spatial factor 8 (CPU-cheap)


@dataclass
class DigitSplit:
    raw: np.ndarray  # [N, 8, 8, 3] uint8: the digits as 8-bit RGB (what the PNG files hold)
    labels: torch.Tensor  # [N] int64
    indices: np.ndarray  # rows of sklearn's load_digits
    size: int = IMAGE_SIZE

    @cached_property
    def images(self) -> torch.Tensor:
        """[N, 3, 1, size, size] in [-1, 1]: the model's input pixels."""
        return upscale(self.raw, self.size)


def to_rgb8(data: np.ndarray) -> np.ndarray:
    """sklearn digit rows [N, 64] (ink 0..16) -> [N, 8, 8, 3] uint8 grey RGB."""
    grey = np.rint(np.asarray(data, dtype=np.float64).reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def upscale(raw: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """[N, 8, 8, 3] uint8 -> [N, 3, 1, size, size] in [-1, 1], exactly as ``preprocess videos`` would."""
    frames = resize_center_crop(raw, size, size)  # the N images as the frames of one clip
    return to_model_input(frames[:, None])


def load_split(split: str = "train", *, seed: int = 0, held_out: float = 0.2, size: int = IMAGE_SIZE) -> DigitSplit:
    """``split`` of load_digits; the permutation is fixed by ``seed``.

    "train" and "held_out" partition the digits; "validation" and "test" are the two halves of
    "held_out" (the video model's splits: settings chosen on one, reported on the other); "all".
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target)
    perm = np.random.default_rng(seed).permutation(n)
    n_held = int(round(n * held_out))
    n_val = n_held // 2
    splits = {"train": perm[n_held:], "held_out": perm[:n_held], "validation": perm[:n_val]}
    splits.update(test=perm[n_val:n_held], all=np.arange(n))
    if split not in splits:
        raise ValueError(f"unknown digits split {split!r}; one of {sorted(splits)}")
    idx = splits[split]
    idx = np.sort(idx)
    return DigitSplit(to_rgb8(digits.data[idx]), torch.as_tensor(digits.target[idx], dtype=torch.long), idx, size)


def write_split_images(split: DigitSplit, folder: Path, limit: int | None = None) -> Path:
    """The split as ``digit-NNNN.png`` + ``digit-NNNN.txt`` (caption) pairs: a folder ``preprocess videos`` reads."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    n = len(split.labels) if limit is None else min(limit, len(split.labels))
    for k in range(n):
        stem = folder / f"digit-{int(split.indices[k]):04d}"
        Image.fromarray(split.raw[k]).save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(caption(int(split.labels[k])) + "\n")
    return folder


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
