"""Shared offline fixtures: tiny Wan pipelines on disk, parquet data, config writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from accel_distill.testing.datasets import write_synthetic_dataset
from accel_distill.testing.tiny_wan import build_tiny_wan, perturb_transformer

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory) -> Path:
    """A random tiny WanPipeline folder (student, critic initialisation)."""
    return build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_wan) -> Path:
    """The same pipeline with a perturbed transformer, so teacher and student disagree."""
    path = build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-teacher")
    perturb_transformer(path, scale=0.05, seed=7)
    return path


@pytest.fixture(scope="session")
def latent_data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "latents.parquet", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "text.parquet", latent_shape=None)


def base_config(method: str, model: Path, teacher: Path, data: Path, out: Path) -> dict:
    """A small valid run config for ``method`` on the tiny models."""
    roles = {"student": {"path": str(model), "trainable": True}}
    method_config: dict = {}
    if method == "dmd2":
        roles["teacher"] = {"path": str(teacher), "trainable": False}
        roles["critic"] = {"path": str(model), "trainable": True, "learning_rate": 2e-4, "betas": [0.0, 0.99]}
        method_config = {
            "rollout_mode": "data",
            "dmd_denoising_steps": [1000, 757, 522],
            "generator_update_interval": 2,
            "real_score_guidance_scale": 3.0,
        }
    return {
        "recipe": {"family": "wan", "method": method},
        "roles": roles,
        "training": {
            "output_dir": str(out),
            "data_path": str(data),
            "seed": 3,
            "max_train_steps": 4,
            "train_batch_size": 2,
            "learning_rate": 1e-4,
            "checkpointing_steps": 2,
            "dataloader_num_workers": 0,
        },
        "pipeline_config": {"flow_shift": 3.0, "text_max_length": 16},
        "method_config": method_config,
    }


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python train_distill.py ARGS`` in a subprocess, as a user runs it."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "train_distill.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=ROOT,
    )


def read_metrics(out: Path) -> list[dict]:
    """Every line of a run's ``logs/metrics.jsonl``, in order."""
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def metrics_by_iteration(out: Path) -> dict[int, dict]:
    return {row["iteration"]: row for row in read_metrics(out)}


CLIP_CAPTIONS = ("a red cat", "the blue dog video", "one green cat", "two red dog")


def preprocess_clips(family: str, model: Path, root: Path, size: list[str], frames: int = 9) -> Path:
    """Four captioned mp4 clips under ``root/media`` through ``preprocess videos --family`` into ``root/out``."""
    from test_preprocess import write_mp4

    from accel_distill.preprocess.cli import main as preprocess_main

    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(CLIP_CAPTIONS):
        write_mp4(media / f"clip{i}.mp4", frames, seed=i)
        (media / f"clip{i}.txt").write_text(caption)
    args = ["videos", "--family", family, "--input", media, "--model", model, "--output", root / "out", *size]
    assert preprocess_main([str(a) for a in args]) == 0
    return root / "out"


def family_config(
    family: str, method: str, student: Path, teacher: Path, data: Path, out: Path, *, text_max_length: int, steps
) -> dict:
    """``base_config`` for another family with an ODE sampler (and DMD2's ``steps``)."""
    cfg = base_config(method, student, teacher, data, out)
    cfg["recipe"]["family"] = family
    cfg["pipeline_config"] = {"text_max_length": text_max_length, "sampler_kind": "ode"}
    if method == "dmd2":
        cfg["method_config"]["dmd_denoising_steps"] = steps
    return cfg
