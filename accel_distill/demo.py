"""``make demo``: build a tiny offline Wan pipeline and data, distill it with DMD2, sample the export.

Runs the real path end to end -- roles loaded from diffusers folders, parquet
streamed, DMD2 trained, checkpointed, exported -- then samples the exported
folder with stock ``WanPipeline`` at the trained step count. No download is needed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from accel_distill.cli import main as train_main
from accel_distill.testing.datasets import write_synthetic_dataset
from accel_distill.testing.tiny_wan import build_tiny_wan, perturb_transformer

CONFIG = "configs/demo/dmd2_tiny.yaml"
ROOT = Path("outputs/demo")


def build_assets() -> None:
    """Model folders and parquet data the demo config points at (kept between runs)."""
    if not (ROOT / "tiny-wan" / "model_index.json").exists():
        build_tiny_wan(ROOT / "tiny-wan", seed=0)
    if not (ROOT / "tiny-wan-teacher" / "model_index.json").exists():
        build_tiny_wan(ROOT / "tiny-wan-teacher", seed=0)
        perturb_transformer(ROOT / "tiny-wan-teacher", scale=0.05, seed=1)
    if not (ROOT / "data").exists():
        for shard in range(2):  # two shards, as a preprocessing job would write them
            write_synthetic_dataset(ROOT / "data" / f"part-{shard:05d}.parquet", num_samples=32, seed=shard)


def sample_export(folder: Path) -> None:
    """Sample the exported student with stock diffusers at its trained step count, as a user would."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    info = json.loads((folder / "accel_distill_export.json").read_text())
    n = info["num_inference_steps"]
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(round(float(kw["timestep"][0]), 1)), with_kwargs=True
    )
    start = time.perf_counter()
    video = pipe(
        prompt="a handwritten digit one",
        num_inference_steps=n,
        guidance_scale=1.0,
        height=32,
        width=32,
        num_frames=5,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames
    print(f"export: {folder} ({type(pipe.scheduler).__name__})")
    print(f"  trained timesteps       {info['timesteps']}")
    print(f"  stock WanPipeline used  {seen}")
    print(f"  {n}-step video {tuple(video.shape)} in {time.perf_counter() - start:.2f}s")


def main() -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    build_assets()
    start = time.perf_counter()
    code = train_main(["--config", CONFIG, *sys.argv[1:]])
    if code != 0:
        return code
    print(f"trained in {time.perf_counter() - start:.1f}s; metrics in outputs/demo/run/logs/metrics.jsonl")
    sample_export(ROOT / "run" / "export")
    return 0


if __name__ == "__main__":
    sys.exit(main())
