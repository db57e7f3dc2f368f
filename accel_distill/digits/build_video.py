"""Rebuild the embedded video teacher ``models/digits-video-wan`` from scratch.

    python -m accel_distill.digits.build_video --out models/digits-video-wan

The image model's stages (accel_distill.digits.build), on moving-digit clips
(accel_distill.digits.video), each one's output under ``--work`` (default
``outputs/digits_video_build``):

1. ``vae``: the same small ``AutoencoderKLWan`` (space 4x, time 2x: 9x16x16 -> 5x4x4 latents)
   trained on clips of the training digits only;
2. ``base``: a complete ``WanPipeline`` folder (that VAE, tiny UMT5 + word tokenizer over the
   caption words, random transformer, flow-matching UniPC scheduler);
3. ``data``: training clips written as GIF + caption files and encoded by ``python -m
   accel_distill.preprocess videos`` -- the users' path -- into the project's parquet;
4. ``teacher``: the project's ``finetune`` recipe ``configs/digits/video_teacher_finetune.yaml``.

``--fast`` shrinks every step count (the test of this recipe uses it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from accel_distill.digits import TEXT_MAX_LENGTH
from accel_distill.digits.build import build_base, preprocess_folder, publish, run_cli, train_teacher
from accel_distill.digits.video import DIRECTIONS, FPS, FRAME_SIZE, NUM_FRAMES, SPEEDS, VIDEO_WORDS

TEACHER_CONFIG = "configs/digits/video_teacher_finetune.yaml"
CLIPS_PER_DIGIT = 4  # training clips written per training digit (each its own direction, speed, start)
VAE_CLIPS = 3000  # clips the VAE trains on
VAE_STEPS = 2500  # ~16 min on the shared 2 cores; at 600 the digits were blobs (MSE 0.06 vs 0.015)
# the image VAE at half width with one level less, time compressed 2x: 9x16x16 -> 5x4x4. With time
# compressed 4x, 800 steps gave position and motion but blobs instead of digits; without any, WanPipeline
# rounds 9 frames up to 10 (it wants num_frames % factor == 1).
VAE_OVERRIDES = dict(
    base_dim=8,
    dim_mult=[1, 2, 2],
    temperal_downsample=[True, False],
    scale_factor_spatial=4,
    scale_factor_temporal=2,
)
# at 3e-3, or with L1 (mostly black frames), it sat at black; with the posterior's noise (std ~1 at the
# start) 600 steps gave blobs where the digits are
VAE_TRAINING = dict(batch_size=8, lr=1e-3, l1_weight=0.0, posterior_noise=0.0)
TRANSFORMER_OVERRIDES = dict(patch_size=(1, 2, 2))


def encode_clips(base: Path, work: Path, *, seed: int, limit: int | None) -> Path:
    """Training clips -> GIF + caption files -> ``preprocess videos`` -> ``work/data/train``."""
    from accel_distill.digits.data import load_split
    from accel_distill.digits.video import make_clips, write_clips

    train = load_split("train", seed=seed)
    clips = make_clips(train, CLIPS_PER_DIGIT * len(train.labels), seed=seed + 1)
    folder = write_clips(clips, work / "clips" / "train", limit=limit)
    size = str(FRAME_SIZE)
    media = ["--media", "video", "--height", size, "--width", size, "--num-frames", str(NUM_FRAMES)]
    return preprocess_folder(base, folder, work / "data" / "train", [*media, "--fps", str(FPS)])


def build(out: Path, work: Path, *, fast: bool = False, vae_steps: int = VAE_STEPS, seed: int = 0) -> Path:
    from diffusers import AutoencoderKLWan

    from accel_distill.digits.data import load_split
    from accel_distill.digits.vae import train_vae
    from accel_distill.digits.video import make_clips

    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "vae" / "config.json").exists():
        clips = make_clips(load_split("train", seed=seed), 16 if fast else VAE_CLIPS, seed=seed)
        training = dict(VAE_TRAINING, batch_size=4) if fast else VAE_TRAINING
        vae = train_vae(clips.pixels(), steps=3 if fast else vae_steps, seed=seed, config=VAE_OVERRIDES, **training)
        vae.save_pretrained(work / "vae")
    print(f"[digits-video] vae ready ({time.perf_counter() - start:.0f}s)", flush=True)
    vae = AutoencoderKLWan.from_pretrained(work / "vae")
    if not (work / "base" / "model_index.json").exists():
        build_base(work / "base", vae, seed=seed, extra_words=tuple(VIDEO_WORDS), transformer=TRANSFORMER_OVERRIDES)
    encode_clips(work / "base", work, seed=seed, limit=32 if fast else None)  # preprocess resumes finished shards
    print(f"[digits-video] base pipeline and parquet ready ({time.perf_counter() - start:.0f}s)", flush=True)
    export = train_teacher(work, fast, TEACHER_CONFIG)
    info = {
        "built_by": "python -m accel_distill.digits.build_video",
        "teacher_config": TEACHER_CONFIG,
        "height": FRAME_SIZE,
        "width": FRAME_SIZE,
        "num_frames": NUM_FRAMES,
        "fps": FPS,
        "text_max_length": TEXT_MAX_LENGTH,
        "caption": "the digit N moves DIRECTION",
        "directions": list(DIRECTIONS),
        "speeds_px_per_frame": list(SPEEDS),
        "split_seed": seed,
        "vae_steps": 3 if fast else vae_steps,
        "fast": fast,
    }
    publish(export, out, info)
    print(f"[digits-video] teacher written to {out} ({time.perf_counter() - start:.0f}s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    prog, description = "python -m accel_distill.digits.build_video", __doc__.splitlines()[0]
    out, work = "models/digits-video-wan", "outputs/digits_video_build"
    return run_cli(argv, build, prog=prog, description=description, out=out, work=work, vae_steps=VAE_STEPS)


if __name__ == "__main__":
    sys.exit(main())
