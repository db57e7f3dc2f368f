"""Shared setup of the DMD2 benchmarks: tiny Wan models + synthetic data -> a real runtime.

Everything goes through the same path a user run takes: ``build_tiny_wan`` writes
diffusers folders, ``write_synthetic_dataset`` writes parquet, ``load_config``
validates a YAML file and ``builder.build_runtime`` loads and wires the roles.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402
import yaml  # noqa: E402

# Per model size: one sample's latent [C, T, H, W] (patch (1, 2, 2) -> T*H*W/4 tokens) and the batch.
SIZES: dict[str, dict] = {
    "tiny": {"latent_shape": (16, 2, 4, 4), "batch_size": 2},
    "20m": {"latent_shape": (16, 5, 16, 16), "batch_size": 2},
}
TEXT_DIM = 32  # text_dim of the "tiny" and "20m" transformers
TEXT_LEN = 8  # stored prompt tokens (write_synthetic_dataset varies 6..8)
TEXT_MAX_LENGTH = 16  # padded length the models see


def build_models_and_data(root: Path, size: str) -> tuple[Path, Path, Path]:
    """Student/critic folder, a different-seed teacher folder and a latent parquet file under ``root``."""
    from accel_distill.testing.datasets import write_synthetic_dataset
    from accel_distill.testing.tiny_wan import build_tiny_wan

    student = build_tiny_wan(root / "student", size=size, seed=0)
    teacher = build_tiny_wan(root / "teacher", size=size, seed=1)
    data = write_synthetic_dataset(
        root / "data.parquet",
        num_samples=64,
        latent_shape=SIZES[size]["latent_shape"],
        text_len=TEXT_LEN,
        text_dim=TEXT_DIM,
        row_group_size=16,
    )
    return student, teacher, data


def dmd2_config(
    student: Path,
    teacher: Path,
    data: Path,
    out: Path,
    *,
    batch_size: int,
    rollout_mode: str,
    steps: Sequence[float],
    interval: int,
    guidance: float = 3.0,
    prefetch: int = 2,
) -> dict:
    """A valid dmd2 run config (as tests/conftest.py's base_config) for the benchmark models."""
    return {
        "recipe": {"family": "wan", "method": "dmd2"},
        "roles": {
            "student": {"path": str(student), "trainable": True},
            "teacher": {"path": str(teacher), "trainable": False},
            "critic": {"path": str(student), "trainable": True, "learning_rate": 2e-4, "betas": [0.0, 0.99]},
        },
        "training": {
            "output_dir": str(out),
            "data_path": str(data),
            "seed": 3,
            "max_train_steps": 1_000_000,
            "train_batch_size": batch_size,
            "learning_rate": 1e-5,
            "checkpointing_steps": 1_000_000,
            "dataloader_num_workers": prefetch,
            "mixed_precision": "no",
        },
        "pipeline_config": {"flow_shift": 3.0, "text_max_length": TEXT_MAX_LENGTH},
        "method_config": {
            "rollout_mode": rollout_mode,
            "dmd_denoising_steps": list(steps),
            "generator_update_interval": interval,
            "real_score_guidance_scale": guidance,
        },
    }


def build_trainer(cfg_dict: dict, path: Path):
    """(runtime, trainer) for ``cfg_dict``, written to ``path`` and loaded like a user config."""
    from accel_distill.builder import build_runtime
    from accel_distill.config.loader import load_config
    from accel_distill.trainer import Trainer

    path.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    cfg = load_config(str(path))
    rt = build_runtime(cfg)
    return rt, Trainer(rt.accelerator, rt.method, iter(rt.stream), cfg.training)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (any accelerator; nothing to wait for on the CPU)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


# The clock ``timed`` reads: wall time (default), or this thread's CPU time (``use_clock("thread")``): on a
# shared machine a descheduled process inflates wall time in bursts, CPU time only by cache effects. CPU
# only, and with the data read inline (no prefetch thread), so that every piece of work is on this thread.
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
_clock = CLOCKS["wall"]


def use_clock(name: str) -> None:
    """Make ``timed`` read ``CLOCKS[name]``."""
    global _clock
    _clock = CLOCKS[name]


def timed(fn, device: torch.device) -> float:
    """Seconds of ``fn()`` on the chosen clock (wall: device work included)."""
    sync(device)
    start = _clock()
    fn()
    sync(device)
    return _clock() - start


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
