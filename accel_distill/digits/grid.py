"""The moving-digits demo's pieces: its prompt parquet and the animated / still sample grids.

``accel_distill.demo`` (``make demo``) runs them around a DMD2 distillation of the video teacher.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

COLUMNS = [("teacher", 50), ("teacher", 4), ("student", 4), ("student", 2), ("student", 1)]
CELL, PAD, LEFT, TOP = 64, 6, 150, 60


def demo_prompts() -> list[tuple[int, int]]:
    """(digit, direction) of the grid's rows: every digit once, the four directions in turn."""
    from accel_distill.digits.video import DIRECTIONS

    return [(d, d % len(DIRECTIONS)) for d in range(10)]


def write_prompt_data(teacher: Path, out: Path, repeats: int = 2, captions: list[str] | None = None) -> Path:
    """Text-only parquet (data-free DMD2): ``captions`` (default: all 40 video captions), each ``repeats``
    times, through ``preprocess prompts`` with the teacher's text encoder, as a user would."""
    from accel_distill.digits import TEXT_MAX_LENGTH
    from accel_distill.digits.video import DIRECTIONS, video_caption
    from accel_distill.preprocess.cli import main as preprocess_main

    if out.exists():  # e.g. an older demo's shards: never mix them in
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if captions is None:
        captions = [video_caption(d, k) for d in range(10) for k in range(len(DIRECTIONS))]
    prompts = out.parent / "prompts.txt"  # each caption equally often in every epoch of the stream
    prompts.write_text("".join(f"{c}\n" for _ in range(repeats) for c in captions))
    args = ["prompts", "--prompts", str(prompts), "--model", str(teacher), "--output", str(out)]
    rows = str(len(captions) * repeats)
    code = preprocess_main([*args, "--text-max-length", str(TEXT_MAX_LENGTH), "--rows-per-shard", rows])
    if code != 0:
        raise SystemExit(f"preprocess prompts failed with exit code {code}")
    return out


def sample_columns(
    teacher: Path, student: Path, seed: int = 0, rows: int = 10
) -> tuple[list[np.ndarray], dict[str, float], float]:
    """[rows, F, H, W] uint8 clips per column (the first ``rows`` demo prompts), seconds per clip, the teacher's CFG."""
    from accel_distill.digits.sample import clip_shape, load_pipeline, sample_frames, teacher_guidance
    from accel_distill.digits.video import to_gray_clips, video_caption

    pipes = {"teacher": load_pipeline(teacher), "student": load_pipeline(student)}
    prompts = [video_caption(d, k) for d, k in demo_prompts()[:rows]]
    seeds = [seed * 1000 + i for i in range(rows)]
    guidance = teacher_guidance(student)  # the teacher at the CFG the student learned; the student without
    cols, times = [], {}
    for who, steps in COLUMNS:
        start = time.perf_counter()
        g = guidance if who == "teacher" else 1.0
        frames = sample_frames(pipes[who], prompts, seeds, steps=steps, guidance_scale=g, **clip_shape(teacher))
        cols.append(to_gray_clips(frames))
        times[f"{who} {steps}"] = (time.perf_counter() - start) / rows
    return cols, times, guidance


def _x(c: int, group: int) -> int:
    """Left edge of cell column ``c``; columns come in groups of ``group`` with a gap between groups."""
    return LEFT + c * (CELL + PAD) + (c // group) * 3 * PAD


def _canvas(headers: list[tuple[str, ...]], n_rows: int, group: int):
    from PIL import Image, ImageDraw

    from accel_distill.digits.video import video_caption

    canvas = Image.new("L", (_x(len(headers), group), TOP + n_rows * (CELL + PAD)), 255)
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(headers):
        for i, text in enumerate(lines):
            draw.text((_x(c, group), 4 + 13 * i), text, fill=0)
    for r, (d, k) in enumerate(demo_prompts()[:n_rows]):
        draw.text((6, TOP + r * (CELL + PAD) + CELL // 2 - 6), f'"{video_caption(d, k)}"', fill=0)
    return canvas


def _paste(canvas, frame: np.ndarray, c: int, r: int, group: int) -> None:
    from PIL import Image

    img = Image.fromarray(frame).resize((CELL, CELL), Image.NEAREST)
    canvas.paste(img, (_x(c, group), TOP + r * (CELL + PAD)))


def write_grids(cols: list[np.ndarray], guidance: float, out_gif: Path, out_png: Path) -> None:
    """The animated grid (one GIF frame per video frame) and the still grid (first, middle, last frame)."""
    labels = [
        (who, f"{steps} step{'s' if steps > 1 else ''}", f"CFG {guidance:g}" if who == "teacher" else "no CFG")
        for who, steps in COLUMNS
    ]
    n_rows, n_frames = cols[0].shape[:2]
    frames = []
    for f in range(n_frames):
        canvas = _canvas([(*lab, f"frame {f + 1}/{n_frames}") for lab in labels], n_rows, 1)
        for c, clips in enumerate(cols):
            for r in range(n_rows):
                _paste(canvas, clips[r, f], c, r, 1)
        frames.append(canvas)
    out_gif.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(out_gif, save_all=True, append_images=frames[1:], duration=150, loop=0)
    picks = [0, n_frames // 2, n_frames - 1]
    heads = [(*(lab if j == 0 else ("", "", "")), f"frame {f + 1}") for lab in labels for j, f in enumerate(picks)]
    still = _canvas(heads, n_rows, len(picks))
    for c, clips in enumerate(cols):
        for j, f in enumerate(picks):
            for r in range(n_rows):
                _paste(still, clips[r, f], c * len(picks) + j, r, len(picks))
    still.save(out_png)
