"""Build a two-digit moving-digits teacher (issue 12, plan B): the video build's stages on two-digit clips.

    python -m accel_distill.digits.build_two_digits --work outputs/exp/two_digits

Clips of ``make_clips(..., digits_per_clip=2)`` ("the digits A and B move DIRECTION", which digit
sits on top / left uncaptioned): every prompt has two well-separated modes, which a few-step sampler
has to resolve early. The stages of ``accel_distill.digits.build_video``, each under ``--work``:

1. ``vae``: the one-digit VAE (``--init-vae``, default ``models/digits-video-wan/vae``) fine-tuned on
   two-digit clips of the training digits (it reconstructs them badly as it is: MSE ~0.12 vs ~0.02);
2. ``base``: a ``WanPipeline`` folder (that VAE, tokenizer also knowing "digits", "and", "move");
3. ``data``: two-digit training clips as GIF + caption files through ``preprocess videos``;
4. ``teacher``: the ``finetune`` recipe ``configs/digits/video_teacher_finetune.yaml`` (``--teacher``;
   off by default: run it with the overrides printed at the end, as a long job of its own).

The one-digit build (``build_video``) and its outputs are unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from accel_distill.digits import TEXT_MAX_LENGTH
from accel_distill.digits.build import build_base, preprocess_folder, train_teacher
from accel_distill.digits.build_video import TEACHER_CONFIG, TRANSFORMER_OVERRIDES, VAE_TRAINING
from accel_distill.digits.video import DIRECTIONS, FPS, FRAME_SIZE, NUM_FRAMES, TWO_DIGIT_WORDS, VIDEO_WORDS

CLIPS_PER_DIGIT = 8  # two-digit training clips per training digit: more (pair, arrangement) combinations
VAE_CLIPS = 3000
VAE_STEPS = 800  # fine-tuning from the one-digit VAE
VAE_LR = 3e-4  # a third of the from-scratch rate: it starts trained


@torch.no_grad()
def reconstruction_mse(vae, pixels: torch.Tensor, batch_size: int = 128) -> float:
    """Mean squared error in [-1, 1] pixels of ``vae`` encoding (posterior mean) and decoding ``pixels``."""
    from accel_distill.digits.vae import decode, encode_mean

    rec = decode(vae, encode_mean(vae, pixels, batch_size), batch_size)
    return float(torch.nn.functional.mse_loss(rec, pixels))


def build_vae(work: Path, init: Path, *, steps: int, seed: int, fast: bool = False) -> dict:
    """Stage 1: fine-tune ``init`` on two-digit training clips; reconstruction MSE on validation clips."""
    from diffusers import AutoencoderKLWan

    from accel_distill.digits.data import load_split
    from accel_distill.digits.vae import train_vae
    from accel_distill.digits.video import make_clips

    val = make_clips(load_split("validation", seed=seed), 64 if fast else 400, seed=seed + 7, digits_per_clip=2)
    vae = AutoencoderKLWan.from_pretrained(init)
    before = reconstruction_mse(vae, val.pixels())
    clips = make_clips(load_split("train", seed=seed), 16 if fast else VAE_CLIPS, seed=seed, digits_per_clip=2)
    training = dict(VAE_TRAINING, lr=VAE_LR, batch_size=4 if fast else VAE_TRAINING["batch_size"])
    vae = train_vae(clips.pixels(), steps=steps, seed=seed, init=vae, **training)
    vae.save_pretrained(work / "vae")
    info = dict(
        init=str(init), steps=steps, lr=VAE_LR, val_mse_before=before, val_mse=reconstruction_mse(vae, val.pixels())
    )
    (work / "vae" / "two_digits_vae.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"[two-digits] vae validation MSE {before:.4f} -> {info['val_mse']:.4f}", flush=True)
    return info


def encode_clips(base: Path, work: Path, *, seed: int, limit: int | None) -> Path:
    """Stage 3: two-digit training clips -> GIF + caption files -> ``preprocess videos`` -> ``work/data/train``."""
    from accel_distill.digits.data import load_split
    from accel_distill.digits.video import make_clips, write_clips

    train = load_split("train", seed=seed)
    clips = make_clips(train, CLIPS_PER_DIGIT * len(train.labels), seed=seed + 1, digits_per_clip=2)
    folder = write_clips(clips, work / "clips" / "train", limit=limit)
    size = str(FRAME_SIZE)
    media = ["--media", "video", "--height", size, "--width", size, "--num-frames", str(NUM_FRAMES)]
    return preprocess_folder(base, folder, work / "data" / "train", [*media, "--fps", str(FPS)])


def build_info(vae_info: dict, seed: int, fast: bool) -> dict:
    """``digits_build.json`` of the two-digit teacher (benchmarks read its clip shape)."""
    return {
        "built_by": "python -m accel_distill.digits.build_two_digits",
        "teacher_config": TEACHER_CONFIG,
        "height": FRAME_SIZE,
        "width": FRAME_SIZE,
        "num_frames": NUM_FRAMES,
        "fps": FPS,
        "text_max_length": TEXT_MAX_LENGTH,
        "caption": "the digits A and B move DIRECTION",
        "digits_per_clip": 2,
        "directions": list(DIRECTIONS),
        "speeds_px_per_frame": [1],
        "split_seed": seed,
        "vae": vae_info,
        "fast": fast,
    }


def build(work: Path, *, init_vae: Path, vae_steps: int, seed: int = 0, fast: bool = False, teacher: bool = False):
    """Stages 1-3 (each skipped when its output exists), stage 4 with ``teacher``; returns ``work``."""
    from diffusers import AutoencoderKLWan

    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    info_path = work / "vae" / "two_digits_vae.json"
    vae_info = json.loads(info_path.read_text()) if info_path.exists() else None
    if vae_info is None:
        vae_info = build_vae(work, init_vae, steps=3 if fast else vae_steps, seed=seed, fast=fast)
    print(f"[two-digits] vae ready ({time.perf_counter() - start:.0f}s)", flush=True)
    if not (work / "base" / "model_index.json").exists():
        vae = AutoencoderKLWan.from_pretrained(work / "vae")
        words = tuple(VIDEO_WORDS + TWO_DIGIT_WORDS)
        build_base(work / "base", vae, seed=seed, extra_words=words, transformer=TRANSFORMER_OVERRIDES)
    (work / "digits_build.json").write_text(json.dumps(build_info(vae_info, seed, fast), indent=2) + "\n")
    encode_clips(work / "base", work, seed=seed, limit=32 if fast else None)
    print(f"[two-digits] base pipeline and parquet ready ({time.perf_counter() - start:.0f}s)", flush=True)
    overrides = [f"roles.student.path={work / 'base'}", f"training.data_path={work / 'data' / 'train'}"]
    overrides.append(f"training.output_dir={work / 'teacher_run'}")
    if teacher:
        export = train_teacher(work, fast, TEACHER_CONFIG)
        (export / "digits_build.json").write_text((work / "digits_build.json").read_text())
        print(f"[two-digits] teacher at {export} ({time.perf_counter() - start:.0f}s)", flush=True)
    else:
        print("[two-digits] teacher: python train_distill.py --config", TEACHER_CONFIG, *overrides, flush=True)
    return work


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m accel_distill.digits.build_two_digits", description=__doc__.splitlines()[0]
    )
    p.add_argument("--work", default="outputs/exp/two_digits")
    p.add_argument("--init-vae", default="models/digits-video-wan/vae", help="the VAE to fine-tune")
    p.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="few steps of everything (tests)")
    p.add_argument("--teacher", action="store_true", help="also train the teacher (stage 4)")
    a = p.parse_args(argv)
    build(Path(a.work), init_vae=Path(a.init_vae), vae_steps=a.vae_steps, seed=a.seed, fast=a.fast, teacher=a.teacher)
    return 0


if __name__ == "__main__":
    sys.exit(main())
