"""Small synthetic parquet datasets in the project's schema (tests, demo, benchmarks)."""

from __future__ import annotations

from pathlib import Path

import torch

from accel_distill.data import write_parquet


def write_synthetic_dataset(
    path: str | Path,
    *,
    num_samples: int = 16,
    latent_shape: tuple[int, ...] | None = (16, 2, 4, 4),
    text_len: int = 8,
    text_dim: int = 32,
    dtype: torch.dtype = torch.float32,
    row_group_size: int = 4,
    seed: int = 0,
) -> Path:
    """Random latents (un-normalised scale) and text embeddings; ``latent_shape=None`` -> text-only."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(num_samples):
        sample = {
            "id": f"sample-{i:05d}",
            "caption": f"a synthetic clip number {i}",
            "text_embedding": torch.randn(text_len - i % 3, text_dim, generator=gen).to(dtype),
        }
        if latent_shape is not None:
            sample["latent"] = (2.0 * torch.randn(latent_shape, generator=gen)).to(dtype)
        samples.append(sample)
    path = Path(path)
    write_parquet(path, samples, row_group_size=row_group_size)
    return path


def mixed_shape_samples(
    counts: dict[tuple[int, ...], int], *, text_dim: int = 8, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> list[dict]:
    """Samples of several latent shapes (``{shape: count}``) in a seeded random interleaving, ids naming the shape.

    Written in order by ``write_parquet``, row groups then hold several shapes: the reader's worst case.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = [s for s, n in counts.items() for _ in range(n)]
    order = torch.randperm(len(shapes), generator=gen).tolist()
    return [
        {
            "id": f"{'x'.join(map(str, shapes[i]))}-{i:03d}",
            "caption": f"clip {i}",
            "latent": torch.randn(shapes[i], generator=gen).to(dtype),
            "text_embedding": torch.randn(1 + i % 4, text_dim, generator=gen).to(dtype),
        }
        for i in order
    ]
