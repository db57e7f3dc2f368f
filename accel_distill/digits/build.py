"""Rebuild the embedded default model ``models/digits-wan`` from scratch.

    python -m accel_distill.digits.build --out models/digits-wan

Stages (each one's output lands under ``--work``, default ``outputs/digits_build``):

1. ``vae``: train a small ``AutoencoderKLWan`` on the training split (accel_distill.digits.vae);
2. ``base``: a complete ``WanPipeline`` folder -- that VAE, a tiny random UMT5 text
   encoder with a word-level tokenizer over the caption words, a random
   ``WanTransformer3DModel`` and a flow-matching UniPC scheduler;
3. ``data``: the digits (train / held-out split fixed by seed) written as PNG +
   caption files under ``images/`` and encoded by ``python -m accel_distill.preprocess
   videos`` -- the path users' data takes -- into the project's parquet;
4. ``teacher``: this project's own ``finetune`` recipe, ``configs/digits/teacher_finetune.yaml``,
   run in-process through ``accel_distill.cli.main``; its export is copied to ``--out``.

``--fast`` shrinks every step count (the test of this recipe uses it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from accel_distill.digits import DIGIT_WORDS, TEXT_MAX_LENGTH
from accel_distill.testing.tiny_wan import save_pipeline, tiny_text_encoder, word_tokenizer

TEACHER_CONFIG = "configs/digits/teacher_finetune.yaml"
FLOW_SHIFT = 3.0
TEXT_DIM = 32
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 1, 1),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=TEXT_DIM,
    freq_dim=64,
    ffn_dim=512,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)


def make_tokenizer(extra_words: tuple[str, ...] = ()):
    """Word-level tokenizer over the caption words (``extra_words`` appended: the video captions')."""
    words = ["a", "an", "the", "handwritten", "digit", "number", *DIGIT_WORDS]
    return word_tokenizer(words + "zero one two three four five six seven eight nine".split() + list(extra_words))


def build_base(
    path: Path, vae, seed: int = 0, extra_words: tuple[str, ...] = (), transformer: dict | None = None
) -> Path:
    """Complete WanPipeline folder with the trained VAE and random text encoder / transformer.

    ``transformer``: overrides of ``TRANSFORMER_CONFIG``.
    """
    from diffusers import WanTransformer3DModel

    tokenizer = make_tokenizer(extra_words)
    torch.manual_seed(seed)
    text_encoder = tiny_text_encoder(len(tokenizer), TEXT_DIM)
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**dict(TRANSFORMER_CONFIG, **(transformer or {})))
    return save_pipeline(
        path, transformer=model, vae=vae, tokenizer=tokenizer, text_encoder=text_encoder, flow_shift=FLOW_SHIFT
    )


def preprocess_folder(base: Path, folder: Path, out: Path, media: list[str]) -> Path:
    """``python -m accel_distill.preprocess videos`` on a folder of media + caption files -- the users' path.

    ``media``: the media arguments (``--media``, size, frames, fps).
    """
    from accel_distill.preprocess.cli import main as preprocess_main

    args = ["videos", "--input", str(folder), "--model", str(base), "--output", str(out), *media, "--strict"]
    args += ["--text-max-length", str(TEXT_MAX_LENGTH), "--vae-batch-size", "64", "--rows-per-shard", "512"]
    args += ["--row-group-size", "64", "--decode-workers", "0"]
    code = preprocess_main(args)
    if code != 0:
        raise SystemExit(f"preprocess of {folder} failed with exit code {code}")
    return out


def encode_split(base: Path, split: str, work: Path, seed: int = 0, limit: int | None = None) -> Path:
    """One split -> ``work/data/<split>``: PNG + caption files, then ``preprocess videos``."""
    from accel_distill.digits.data import IMAGE_SIZE, load_split, write_split_images

    images = write_split_images(load_split(split, seed=seed), work / "images" / split, limit=limit)
    media = ["--media", "image", "--height", str(IMAGE_SIZE), "--width", str(IMAGE_SIZE), "--num-frames", "1"]
    return preprocess_folder(base, images, work / "data" / split, media)


def train_teacher(work: Path, fast: bool, config: str = TEACHER_CONFIG) -> Path:
    """The project's ``finetune`` recipe ``config`` on ``work/base`` and ``work/data/train``; its export."""
    from accel_distill.cli import main as train_main

    run = work / "teacher_run"
    overrides = [
        f"roles.student.path={work / 'base'}",
        f"training.data_path={work / 'data' / 'train'}",
        f"training.output_dir={run}",
    ]
    if fast:
        overrides += ["training.max_train_steps=4", "training.checkpointing_steps=2", "training.train_batch_size=8"]
    code = train_main(["--config", config, *overrides])
    if code != 0:
        raise SystemExit(f"teacher finetune failed with exit code {code}")
    return run / "export"


def build(out: Path, work: Path, *, fast: bool = False, vae_steps: int = 2000, seed: int = 0) -> Path:
    from diffusers import AutoencoderKLWan

    from accel_distill.digits.data import load_split
    from accel_distill.digits.vae import train_vae

    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "vae" / "config.json").exists():
        train = load_split("train", seed=seed)
        vae = train_vae(train.images, steps=3 if fast else vae_steps, batch_size=8 if fast else 32, seed=seed)
        vae.save_pretrained(work / "vae")
    print(f"[digits] vae ready ({time.perf_counter() - start:.0f}s)")
    vae = AutoencoderKLWan.from_pretrained(work / "vae")
    if not (work / "base" / "model_index.json").exists():
        build_base(work / "base", vae, seed=seed)
    limit = 64 if fast else None
    for split in ("train", "held_out"):  # preprocess resumes: finished shards are kept
        encode_split(work / "base", split, work, seed=seed, limit=limit)
    print(f"[digits] base pipeline and parquet ready ({time.perf_counter() - start:.0f}s)")
    export = train_teacher(work, fast)
    info = {
        "built_by": "python -m accel_distill.digits.build",
        "teacher_config": TEACHER_CONFIG,
        "image_size": int(vae.config.get("scale_factor_spatial", 8)) * 2,
        "text_max_length": TEXT_MAX_LENGTH,
        "caption": "a handwritten digit N",
        "split_seed": seed,
        "fast": fast,
    }
    publish(export, out, info)
    print(f"[digits] teacher written to {out} ({time.perf_counter() - start:.0f}s)")
    return out


def publish(export: Path, out: Path, info: dict) -> None:
    """Copy the teacher export to ``out`` with ``digits_build.json`` (how it was built, its sample size)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(export, out)
    (out / "digits_build.json").write_text(json.dumps(info, indent=2) + "\n")


def run_cli(
    argv: list[str] | None, build_fn, *, prog: str, description: str, out: str, work: str, vae_steps: int
) -> int:
    """The command line of a digits build (image or video): ``build_fn(out, work, fast=, vae_steps=, seed=)``."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--out", default=out)
    p.add_argument("--work", default=work)
    p.add_argument("--fast", action="store_true", help="few steps of everything (tests)")
    p.add_argument("--vae-steps", type=int, default=vae_steps)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    build_fn(Path(a.out), Path(a.work), fast=a.fast, vae_steps=a.vae_steps, seed=a.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    prog, description = "python -m accel_distill.digits.build", __doc__.splitlines()[0]
    return run_cli(
        argv,
        build,
        prog=prog,
        description=description,
        out="models/digits-wan",
        work="outputs/digits_build",
        vae_steps=2000,
    )


if __name__ == "__main__":
    sys.exit(main())
