"""Per-rank peak activation memory with context parallelism (CP = 2) vs without, side by side (CPU, gloo).

An activation-dominated run: ``finetune`` of a Wan transformer (the "20m" blocks: 6 heads x 64,
ffn 1536; 4 of them) on long clips, batch 1 per data-parallel rank, 2 iterations, FSDP2 over 2
processes in every run (so weights, gradients and AdamW states per rank are the same and only
activations differ). Runs, all real ``train_distill.py`` runs through ``tests/launch/fsdp_cpu.py``:

* ``cp1``: 2 processes, ``context_parallel_size: 1``: each rank trains on its own clip of N tokens;
* ``cp2``: 2 processes, ``context_parallel_size: 2``: the two ranks train on one clip of N tokens,
  each holding N / 2 of them between the first block and the output;
* ``cp2 x2``: as ``cp2`` on a clip of 2N tokens (the same tokens per device as ``cp1``).

Each rank reports its RSS by phase (benchmarks/fsdp_memhook.py) under glibc's ``mmap-1mib`` malloc
setting (every tensor of 1 MiB or more is its own mapping, so RSS follows the live tensors).
``activation peak`` is the training phase's peak RSS minus the RSS after the last iteration (weights,
AdamW states and the process stay; what a step allocates and frees is gone): the step's
activations, plus its transient gradients and FSDP all-gather buffers, which are the same in all
runs (so the ratio understates what CP saves). ``tokens per device at equal peak`` interpolates the
CP = 2 peaks linearly in tokens to the token count whose peak equals ``cp1``'s.

``--four`` also runs the 4-process layout once (data 2 x CP 2, FSDP2 over 4 ranks) on the tiny Wan
against 2 processes without CP (data 2): the same samples per data rank and the same noise, so
losses, gradient norms and the exported student must agree (printed; too slow for the test suite
on 2 cores).

    PYTHONPATH=. .venv/bin/python benchmarks/context_parallel_memory.py [--four]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.fsdp_common import build_pipeline, md_table, mib, run_fsdp, write_yaml
from benchmarks.fsdp_memory import finetune_config

HEIGHT_WIDTH = 64  # latent 64 x 64 -> 32 x 32 tokens per latent frame after the (1, 2, 2) patch


def transformer_config() -> dict:
    from accel_distill.testing.tiny_wan import tiny_transformer_config

    cfg = tiny_transformer_config("20m")
    cfg.update(num_layers=4, rope_max_seq_len=64)
    return cfg


def write_clips(path: Path, frames: int) -> Path:
    from accel_distill.testing.datasets import write_synthetic_dataset

    shape = (16, frames, HEIGHT_WIDTH, HEIGHT_WIDTH)
    return write_synthetic_dataset(path, num_samples=4, latent_shape=shape, text_len=8, text_dim=32)


def run_config(model: Path, data: Path, out: Path, cp: int) -> dict:
    cfg = finetune_config(model, data, out, steps=2)
    cfg["training"]["context_parallel_size"] = cp
    return cfg


def activation_peaks(reports: list[dict]) -> list[int]:
    return [r["peaks"]["train"] - r["rss_at_end"]["train"] for r in reports]


def memory(tmp: Path) -> None:
    model = build_pipeline(tmp / "model", transformer_config())
    rows, measured = [], {}
    for name, cp, frames in (("cp1", 1, 2), ("cp2", 2, 2), ("cp2 x2", 2, 4)):
        data = write_clips(tmp / f"clips{frames}.parquet", frames)
        config = write_yaml(tmp / f"{name}.yaml".replace(" ", ""), run_config(model, data, tmp / "out", cp))
        reports, wall = run_fsdp(config, tmp / f"mem_{cp}_{frames}", malloc="mmap-1mib")
        peaks = activation_peaks(reports)
        tokens = frames * (HEIGHT_WIDTH // 2) ** 2
        measured[name] = (tokens // cp, max(peaks))
        rows.append([name, tokens, tokens // cp, *(mib(p) for p in peaks), f"{wall:.0f}"])
    print(md_table(["run", "clip tokens", "tokens per device", "rank 0 MiB", "rank 1 MiB", "wall s"], rows))
    (t1, p1), (t2, p2), (t3, p3) = measured["cp1"], measured["cp2"], measured["cp2 x2"]
    slope = (p3 - p2) / (t3 - t2)
    fits = t2 + (p1 - p2) / slope if slope > 0 else float("inf")  # CP = 2 clip tokens per device at cp1's peak
    print(f"\nactivation peak per rank, same clip: CP=1 / CP=2 = {p1 / p2:.2f}x")
    print(f"CP=2 on a clip twice as long: {p3 / p1:.2f}x the CP=1 peak per rank")
    print(f"tokens per device at equal peak: CP=2 fits {2 * fits / t1:.2f}x the clip tokens of CP=1 (target >= 1.8x)")


def four_processes(tmp: Path) -> None:
    """data 2 x CP 2 on 4 processes vs data 2 on 2 processes: same losses and update."""
    from safetensors.torch import load_file

    from accel_distill.testing.datasets import write_synthetic_dataset
    from accel_distill.testing.tiny_wan import build_tiny_wan

    model = build_tiny_wan(tmp / "tiny")
    data = write_synthetic_dataset(tmp / "tiny.parquet", latent_shape=(16, 2, 4, 4))
    outs = {}
    for name, processes, cp in (("data2", 2, 1), ("data2xcp2", 4, 2)):
        cfg = run_config(model, data, tmp / name, cp)
        cfg["training"].update(max_train_steps=3, train_batch_size=2, learning_rate=1e-4)
        config = write_yaml(tmp / f"{name}.yaml", cfg)
        run_fsdp(config, tmp / f"mem_{name}", processes=processes)
        outs[name] = tmp / name
    rows = {
        n: [json.loads(line) for line in (o / "logs" / "metrics.jsonl").read_text().splitlines()]
        for n, o in outs.items()
    }
    for a, b in zip(rows["data2"], rows["data2xcp2"]):
        keys = [k for k in a if "loss" in k or k.startswith("grad_norm")]
        print(f"iteration {a['iteration']}: " + ", ".join(f"{k} {a[k]:.6g} / {b[k]:.6g}" for k in keys))
    w = {n: load_file(o / "export" / "transformer" / "diffusion_pytorch_model.safetensors") for n, o in outs.items()}
    base = load_file(model / "transformer" / "diffusion_pytorch_model.safetensors")
    diff = sum(((w["data2"][k] - w["data2xcp2"][k]).double() ** 2).sum() for k in base)
    step = sum(((w["data2"][k] - base[k]).double() ** 2).sum() for k in base)
    print(f"4 processes (data 2 x CP 2) vs 2 (data 2): relative update error {float((diff / step).sqrt()):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--four", action="store_true", help="also check data 2 x CP 2 on 4 processes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        memory(Path(tmp))
        if args.four:
            print()
            four_processes(Path(tmp))


if __name__ == "__main__":
    main()
