"""``make demo``: distill the committed digits teacher with DMD2, then sample teacher and student.

Runs the real path end to end -- roles loaded from the diffusers folder
``models/digits-wan`` (a tiny Wan pipeline trained on scikit-learn's digits by
``python -m accel_distill.digits.build``), parquet streamed, DMD2 trained,
checkpointed, exported -- then loads the teacher and the exported student with
stock ``WanPipeline`` and writes ``outputs/demo/samples.png``: one row per digit
0-9; columns teacher 50 steps, teacher 4 steps, student 1, 2 and 4 steps.
No download is needed.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from accel_distill.cli import main as train_main

CONFIG = "configs/demo/dmd2_digits.yaml"
TEACHER = Path("models/digits-wan")
ROOT = Path("outputs/demo")
COLUMNS = [("teacher", 50), ("teacher", 4), ("student", 1), ("student", 2), ("student", 4)]


def write_prompt_data(teacher: Path, out: Path, repeats: int = 8) -> Path:
    """Text-only parquet (data-free DMD2): the ten captions through ``preprocess prompts``, as a user would."""
    from accel_distill.digits import TEXT_MAX_LENGTH, caption
    from accel_distill.preprocess.cli import main as preprocess_main

    if out.exists():  # e.g. an older demo's shards: never mix them in
        shutil.rmtree(out)
    out.mkdir(parents=True)
    prompts = out.parent / "prompts.txt"  # each digit equally often in every epoch of the stream
    prompts.write_text("".join(f"{caption(d)}\n" for _ in range(repeats) for d in range(10)))
    args = ["prompts", "--prompts", str(prompts), "--model", str(teacher), "--output", str(out)]
    code = preprocess_main([*args, "--text-max-length", str(TEXT_MAX_LENGTH), "--rows-per-shard", str(10 * repeats)])
    if code != 0:
        raise SystemExit(f"preprocess prompts failed with exit code {code}")
    return out


def sample_grid(teacher: Path, student: Path, out_png: Path, seed: int = 0) -> dict[str, float]:
    """The labelled samples grid; returns seconds per image for each column."""
    from PIL import Image, ImageDraw

    from accel_distill.digits.sample import generate, load_pipeline, teacher_guidance

    pipes = {"teacher": load_pipeline(teacher), "student": load_pipeline(student)}
    digits = list(range(10))
    seeds = [seed * 1000 + d for d in digits]
    guidance = teacher_guidance(student)  # the teacher at the CFG the student learned; the student without
    cols, times = [], {}
    for who, steps in COLUMNS:
        start = time.perf_counter()
        g = guidance if who == "teacher" else 1.0
        cols.append(generate(pipes[who], digits, seeds, steps=steps, guidance_scale=g))
        times[f"{who} {steps}"] = (time.perf_counter() - start) / len(digits)
    cell, pad, left, top = 64, 6, 60, 47
    w = left + len(COLUMNS) * (cell + pad)
    h = top + len(digits) * (cell + pad)
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (who, steps) in enumerate(COLUMNS):
        x = left + c * (cell + pad)
        draw.text((x, 4), who, fill="black")
        draw.text((x, 17), f"{steps} step{'s' if steps > 1 else ''}", fill="black")
        draw.text((x, 30), f"CFG {guidance:g}" if who == "teacher" else "no CFG", fill="black")
        for r in digits:
            img = Image.fromarray(cols[c][r]).resize((cell, cell), Image.NEAREST).convert("RGB")
            canvas.paste(img, (x, top + r * (cell + pad)))
    for r in digits:
        draw.text((6, top + r * (cell + pad) + cell // 2 - 6), f'"{r}"', fill="black")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    return times


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m accel_distill.demo",
        description=f"Distill {TEACHER} with DMD2 ({CONFIG}) and write {ROOT}/samples.png.",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help=f"dotted overrides of {CONFIG}")
    overrides = parser.parse_args(argv).overrides
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not (TEACHER / "model_index.json").exists():
        print(f"error: {TEACHER} missing; rebuild it with python -m accel_distill.digits.build", file=sys.stderr)
        return 2
    write_prompt_data(TEACHER, ROOT / "data")
    start = time.perf_counter()
    code = train_main(["--config", CONFIG, *overrides])
    if code != 0:
        return code
    print(f"distilled in {time.perf_counter() - start:.1f}s; metrics in {ROOT}/run/logs/metrics.jsonl")
    export = ROOT / "run" / "export"
    info = json.loads((export / "accel_distill_export.json").read_text())
    print(f"export: {export} (trained timesteps {info['timesteps']})")
    times = sample_grid(TEACHER, export, ROOT / "samples.png")
    print(f"wrote {ROOT / 'samples.png'}; seconds per image: " + ", ".join(f"{k}: {v:.3f}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
