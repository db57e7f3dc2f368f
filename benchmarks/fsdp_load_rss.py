"""Per-rank peak host memory while the models load, FSDP2 x 2 processes, rank-0 loading on / off.

A DMD2 run whose frozen teacher is big (~277M fp32 parameters: the "20m" Wan
transformer widened to 16 heads x 64, ffn 4096, 16 blocks; ~1 GiB) while the
trainable student and critic are the small "20m" one. Both settings run the same
config file with ``accelerate launch --config_file accelerate_configs/fsdp8.yaml
--num_processes 2 ... tests/launch/fsdp_cpu.py --config run.yaml
roles.teacher.rank0_loading=true|false``, one training iteration each, for a teacher
stored in fp32 (``from_pretrained`` keeps the weights in the mmapped safetensors file:
file-backed pages read lazily, so a rank that shards the module itself only touches its
own rows) and in bf16 (converted on load into an anonymous fp32 copy of the whole teacher,
as a bf16 teacher is from an fp32 checkpoint in a bf16 run).

``load`` is ``builder.load_bundle``: every role read from disk (``from_pretrained``)
or built on the meta device (ranks > 0 with rank-0 loading), FSDP2-sharded (frozen
roles by ``accel_distill.distributed.fsdp_shard``, trainable ones by
``accelerator.prepare``), optimizers made. Columns are MiB over the RSS just before
loading: the kernel's exact peak RSS of the phase (``VmHWM``), and the highest
anonymous (tensors, heap) and file-backed (the mmapped safetensors file, page cache
that every process mapping it shares) parts seen by a 5 ms sampler, then the RSS
right after loading (what stays: the shards).

    PYTHONPATH=. .venv/bin/python benchmarks/fsdp_load_rss.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from benchmarks import common
from benchmarks.fsdp_common import (
    MALLOC_ENVS,
    big_transformer_config,
    build_pipeline,
    local_numel,
    md_table,
    mib,
    param_shapes,
    run_fsdp,
    write_data,
    write_yaml,
)


def dmd2_config(student: Path, teacher: Path, data: Path, out: Path) -> dict:
    """The benchmarks' dmd2 config, one iteration, batch 1, read inline: only loading matters here."""
    cfg = common.dmd2_config(
        student, teacher, data, out, batch_size=1, rollout_mode="data", steps=[1000, 757, 522], interval=1, prefetch=0
    )
    cfg["training"]["max_train_steps"] = 1
    return cfg


def load_stats(rep: dict) -> dict:
    base, split = rep["baseline_rss"], rep["baseline_split"]
    sampled = rep["sampled_peaks"].get("load", {})
    return {
        "peak": rep["peaks"]["load"] - base,
        "anon": sampled["anon"] - split["anon"] if sampled else None,
        "file": sampled["file"] - split["file"] if sampled else None,
        "after": rep["rss_at_end"]["load"] - base,
        "baseline": base,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16, help="teacher blocks")
    parser.add_argument("--heads", type=int, default=16, help="teacher heads (x 64 = hidden size)")
    parser.add_argument("--ffn", type=int, default=4096, help="teacher ffn size")
    parser.add_argument(
        "--stored", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"], help="teacher dtype on disk"
    )
    parser.add_argument("--malloc", choices=sorted(MALLOC_ENVS), default="default", help="glibc setting")
    args = parser.parse_args()

    tcfg = big_transformer_config(args.layers, args.heads, args.ffn)
    shapes = param_shapes(tcfg)
    n_teacher = local_numel(shapes, 0, 1)
    teacher_bytes = 4 * n_teacher  # loaded in fp32 (mixed precision "no"), whatever the file holds
    shard_bytes = [4 * local_numel(shapes, r, 2) for r in range(2)]
    os.environ["MEM_SAMPLE_MS"] = "5"
    results, walls = {}, []
    with tempfile.TemporaryDirectory(prefix="fsdp_load_rss_") as tmp:
        root = Path(tmp)
        student = build_pipeline(root / "student")
        data = write_data(root / "data.parquet")
        for stored in args.stored:
            teacher = build_pipeline(root / f"teacher_{stored}", tcfg, seed=1, dtype=stored)
            config = write_yaml(root / f"run_{stored}.yaml", dmd2_config(student, teacher, data, root / "out"))
            for rank0 in ("true", "false"):
                tag = f"{stored}_{rank0}"
                reps, wall = run_fsdp(
                    config,
                    root / f"mem_{tag}",
                    f"roles.teacher.rank0_loading={rank0}",
                    f"training.output_dir={root / ('out_' + tag)}",
                    malloc=args.malloc,
                )
                results[stored, rank0] = [load_stats(r) for r in reps]
                walls.append(f"{stored} file, rank0_loading={rank0}: {wall:.0f} s")

    print(
        f"dmd2, FSDP2 x 2 processes, frozen teacher of {n_teacher / 1e6:.1f}M params loaded in fp32 "
        f"({mib(teacher_bytes)} MiB; FSDP2 shards {mib(shard_bytes[0])} / {mib(shard_bytes[1])} MiB), "
        f"trainable student + critic of the '20m' size (~20M params each), malloc {args.malloc}, 1 iteration."
    )
    print(f"Wall: {'; '.join(walls)}.")
    print(
        "MiB over the RSS just before loading (baseline: raw MiB). fp32 file: from_pretrained maps the "
        "safetensors file and keeps the weights there (file-backed, read lazily); bf16 file: it converts "
        "them into an fp32 copy (anonymous). anon / file-backed: sampled every 5 ms."
    )
    print()
    header = [
        "teacher file",
        "rank0_loading",
        "rank",
        "baseline RSS",
        "load peak RSS delta",
        "anon peak delta",
        "file-backed peak delta",
        "RSS delta after load",
    ]
    rows = []
    for (stored, rank0), ranks in results.items():
        for rank, d in enumerate(ranks):
            rows.append(
                [
                    stored,
                    rank0,
                    rank,
                    mib(d["baseline"]),
                    mib(d["peak"]),
                    mib(d["anon"]),
                    mib(d["file"]),
                    mib(d["after"]),
                ]
            )
    print(md_table(header, rows))
    print()
    for stored in args.stored:
        for rank in range(2):
            on, off = results[stored, "true"][rank], results[stored, "false"][rank]
            drop = off["peak"] - on["peak"]
            print(
                f"{stored} file, rank {rank}: load peak delta {mib(off['peak'])} (rank0_loading=false) -> "
                f"{mib(on['peak'])} MiB (true): drop {mib(drop)} MiB = {drop / teacher_bytes:.2f}x the teacher"
            )
    summary = []
    for stored in args.stored:
        on, off = results[stored, "true"][1], results[stored, "false"][1]
        summary.append(
            f"{stored} file {on['peak'] / off['peak']:.2f}x (drop {(off['peak'] - on['peak']) / teacher_bytes:.2f}x "
            "the teacher)"
        )
    print(
        f"ratio (rank 1 load peak RSS delta, rank0_loading true / false; teacher {mib(teacher_bytes)} MiB in fp32): "
        + ", ".join(summary)
    )


if __name__ == "__main__":
    main()
