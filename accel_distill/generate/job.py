"""One generation job: the teacher samples each input's row, the shards are written like preprocess's.

Row ``i`` of the input starts from the noise of its own seed, ``derived_seed(seed, GENERATE_STREAM, i)``,
drawn on the CPU, and the rows of a shard are sampled in fixed chunks of ``batch_size``: a shard's
bytes depend on neither the rank that makes it nor the number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from accel_distill.data.schema import NOISE, TRAJ_LATENTS, TRAJ_TIMESTEPS
from accel_distill.methods.base import derived_seed
from accel_distill.preprocess.jobs import Report, run_shards
from accel_distill.preprocess.shards import ShardStore

from .teacher import Teacher

# derived_seed stream of generation noise (methods use 0 and 1, validation 2).
GENERATE_STREAM = 3


@dataclass
class GenerateJob:
    """Settings of ``python -m accel_distill.generate`` (see its CLI for their meaning)."""

    latent_shape: tuple[int, ...]
    height: int
    width: int
    num_frames: int
    guidance_scale: float
    # the trajectory: the samples these teacher steps start from, or the samples at these timesteps
    save_steps: Sequence[int] = ()
    save_timesteps: Sequence[float] = ()
    seed: int = 0
    batch_size: int = 1
    text_max_length: int = 512
    rows_per_shard: int = 8
    row_group_size: int | None = None
    store_dtype: torch.dtype = torch.float32


def row_noise(seed: int, rows: range, shape: Sequence[int]) -> torch.Tensor:
    """``[len(rows), *shape]`` float32 starting noise, each row's from its own seed (CPU: any device agrees)."""
    gens = [torch.Generator().manual_seed(derived_seed(seed, GENERATE_STREAM, i)) for i in rows]
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens])


def padded(embeds: list[torch.Tensor], length: int) -> torch.Tensor:
    """``[B, length, D]`` of ``[L_i, D]`` embeddings, zero-padded at the end as the training reader pads."""
    out = torch.zeros((len(embeds), length, embeds[0].shape[-1]), dtype=embeds[0].dtype)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
    return out


def generate(
    inputs,
    teacher: Callable[[], Teacher],
    negative: Callable[[], torch.Tensor | None],
    job: GenerateJob,
    store: ShardStore,
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> Report:
    """Sample this rank's unfinished shards of ``inputs`` (``PromptInputs`` / ``ParquetInputs``) into ``store``.

    ``teacher()`` and ``negative()`` (the ``[L, D]`` unconditional embedding, None without CFG) are called
    only when a shard is to be made, so a finished job loads no model.
    """

    def make_shard(lo: int, hi: int, report: Report, advance: Callable[[int], None]) -> list[dict]:
        t, neg = teacher(), negative()
        rows = inputs.rows(lo, hi)
        for start in range(0, len(rows), job.batch_size):
            chunk = rows[start : start + job.batch_size]
            sample_rows(t, neg, job, chunk, range(lo + start, lo + start + len(chunk)))
            advance(len(chunk))
        return rows

    return run_shards(
        store,
        len(inputs),
        job.rows_per_shard,
        make_shard,
        desc="generating",
        row_group_size=job.row_group_size,
        rank=rank,
        world_size=world_size,
        barrier=barrier,
        command="generate",
    )


def sample_rows(
    teacher: Teacher, neg_text: torch.Tensor | None, job: GenerateJob, rows: list[dict], positions: range
) -> None:
    """Sample ``rows`` (input rows at ``positions``) with the teacher; fill in each row's latent and trajectory."""
    adapter, device = teacher.adapter, teacher.device
    text = padded([r["text_embedding"] for r in rows], job.text_max_length).to(device)
    cond = adapter.conditioning({"text_embeds": text})
    neg = adapter.negative(cond, neg_text.to(device)) if neg_text is not None else None
    noise = row_noise(job.seed, positions, job.latent_shape)
    x0, traj = teacher.sample(noise, cond, neg, job.guidance_scale, steps=job.save_steps, at=job.save_timesteps)
    raw = adapter.denormalize_latents(x0).cpu()  # the latent column is un-normalised, as preprocess stores it
    if job.save_steps:
        timesteps = teacher.timesteps[list(job.save_steps)]
    else:
        timesteps = torch.tensor(list(job.save_timesteps), dtype=torch.float32)
    traj = traj.cpu()
    for i, row in enumerate(rows):
        row.update(
            latent=raw[i].to(job.store_dtype),
            width=job.width,
            height=job.height,
            num_frames=job.num_frames,
            media_type="image" if job.num_frames == 1 else "video",
            tensors={
                TRAJ_LATENTS: traj[i].to(job.store_dtype),
                TRAJ_TIMESTEPS: timesteps.clone(),
                NOISE: noise[i].to(job.store_dtype),
            },
        )
