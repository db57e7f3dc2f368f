"""``make demo``: distill the committed moving-digits video teacher with DMD2, then sample teacher and student.

Runs the real path end to end -- roles loaded from the diffusers folder
``models/digits-video-wan`` (a tiny Wan pipeline trained on 9-frame clips of
scikit-learn's digits moving in a captioned direction, by ``python -m
accel_distill.digits.build_video``), parquet streamed, DMD2 trained, checkpointed,
exported -- then loads the teacher and the exported student with stock
``WanPipeline`` and writes ``outputs/demo/samples.gif`` (the clips, animated) and
``outputs/demo/samples.png`` (their first, middle and last frames): one row per prompt
"the digit N moves DIRECTION"; columns teacher 50 and 4 steps (with the CFG the
student learned), student 4, 2 and 1 steps (no CFG). No download is needed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from accel_distill.cli import main as train_main
from accel_distill.digits.grid import sample_columns, write_grids, write_prompt_data

CONFIG = "configs/demo/dmd2_digits_video.yaml"
TEACHER = Path("models/digits-video-wan")
ROOT = Path("outputs/demo")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m accel_distill.demo",
        description=f"Distill {TEACHER} with DMD2 ({CONFIG}) and write {ROOT}/samples.gif and samples.png.",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help=f"dotted overrides of {CONFIG}")
    overrides = parser.parse_args(argv).overrides
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not (TEACHER / "model_index.json").exists():
        print(f"error: {TEACHER} missing; rebuild it with python -m accel_distill.digits.build_video", file=sys.stderr)
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
    cols, times, guidance = sample_columns(TEACHER, export)
    write_grids(cols, guidance, ROOT / "samples.gif", ROOT / "samples.png")
    print(f"wrote {ROOT / 'samples.gif'} and {ROOT / 'samples.png'}; seconds per clip: ", end="")
    print(", ".join(f"{k}: {v:.3f}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
