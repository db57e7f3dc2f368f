"""Per-rank peak host memory of FSDP2 with 2 processes vs one plain process (CPU, gloo).

A params + optimizer dominated run: ``finetune`` of one trainable fp32 student of
~143M parameters (the "20m" Wan transformer widened to 16 heads x 64, ffn 4096, 8
blocks), AdamW, batch 1 of one-token latents (activations are negligible), a few
iterations. Both runs are real ``train_distill.py`` runs on the same config file:

* single: ``python benchmarks/fsdp_single.py --config run.yaml`` (no accelerate launch:
  one process, no sharding);
* fsdp x2: ``accelerate launch --config_file accelerate_configs/fsdp8.yaml
  --num_processes 2 ... tests/launch/fsdp_cpu.py --config run.yaml`` (the project's
  FSDP2 path; the shim only keeps accelerate's FSDP plugin on CPU).

Each process reports its RSS by phase (benchmarks/fsdp_memhook.py): ``baseline`` is
the RSS just before the models load (torch, accelerate, the process group: about the
same in every process and not what sharding can save); every other column is a phase
peak minus that baseline. ``train`` is the peak over loading + all training
iterations (forward, backward, clip, AdamW), what the headline compares; the run's
final checkpoint and the export of the student are reported on their own (they
write/gather full copies). ``theory`` is params + grads + AdamW's two moments,
16 bytes per fp32 parameter held by the rank (FSDP2 dim-0 shards, padding included).

    PYTHONPATH=. .venv/bin/python benchmarks/fsdp_memory.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.fsdp_common import (
    big_transformer_config,
    build_pipeline,
    local_numel,
    md_table,
    mib,
    param_shapes,
    run_fsdp,
    run_single,
    write_data,
    write_yaml,
)

TRAIN_PHASES = ("load", "setup", "train", "between")  # everything up to the final checkpoint


def finetune_config(model: Path, data: Path, out: Path, steps: int) -> dict:
    return {
        "recipe": {"family": "wan", "method": "finetune"},
        "roles": {"student": {"path": str(model), "trainable": True}},
        "training": {
            "output_dir": str(out),
            "data_path": str(data),
            "seed": 3,
            "max_train_steps": steps,
            "train_batch_size": 1,
            "learning_rate": 1e-5,
            "checkpointing_steps": 1_000_000,  # only the run's final checkpoint
            "dataloader_num_workers": 0,
            "mixed_precision": "no",
        },
        "pipeline_config": {"flow_shift": 3.0, "text_max_length": 16},
        "method_config": {"cfg_dropout_rate": 0.0},
    }


def summarize(label: str, rank: int, rep: dict, theory: int) -> tuple[list[object], dict]:
    base, peaks = rep["baseline_rss"], rep["peaks"]

    def delta(phases) -> int | None:
        got = [peaks[p] for p in phases if p in peaks]
        return max(got) - base if got else None

    whole = max([*peaks.values(), rep["ru_maxrss_start"]])
    d = {
        "train": delta(TRAIN_PHASES),
        "load": delta(("load",)),
        "steps": delta(("train",)),
        "checkpoint": delta(("checkpoint",)),
        "export": delta(("export",)),
        "whole": whole,
        "whole_delta": whole - base,
    }
    row = [
        label,
        rank,
        mib(base),
        mib(whole),
        mib(d["whole_delta"]),
        mib(d["load"]),
        mib(d["steps"]),
        mib(d["train"]),
        mib(d["checkpoint"]),
        mib(d["export"]),
        mib(theory),
    ]
    return row, d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16, help="x 64 = hidden size")
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    tcfg = big_transformer_config(args.layers, args.heads, args.ffn)
    shapes = param_shapes(tcfg)
    n_params = local_numel(shapes, 0, 1)
    with tempfile.TemporaryDirectory(prefix="fsdp_memory_") as tmp:
        root = Path(tmp)
        model = build_pipeline(root / "student", tcfg)
        data = write_data(root / "data.parquet")
        config = write_yaml(root / "run.yaml", finetune_config(model, data, root / "out", args.steps))
        single, t_single = run_single(config, root / "mem_single", f"training.output_dir={root / 'out_single'}")
        fsdp, t_fsdp = run_fsdp(config, root / "mem_fsdp", f"training.output_dir={root / 'out_fsdp'}")

    print(
        f"finetune, fp32 student of {n_params / 1e6:.1f}M params ({n_params * 4 / 2**20:,.0f} MiB), AdamW, "
        f"batch 1, {args.steps} iterations; wall: single {t_single:.0f} s, fsdp x2 {t_fsdp:.0f} s. "
        "MiB; delta = peak RSS - RSS just before the models load."
    )
    header = [
        "run",
        "rank",
        "baseline RSS",
        "peak RSS (raw, whole run)",
        "whole run delta",
        "load delta",
        "train-steps delta",
        "load+train delta",
        "final checkpoint delta",
        "export delta",
        "theory: params+grads+Adam",
    ]
    rows, deltas = [], {}
    row, deltas["single"] = summarize("single", 0, single[0], 16 * n_params)
    rows.append(row)
    for rank, rep in enumerate(fsdp):
        row, deltas[f"fsdp{rank}"] = summarize("fsdp x2", rank, rep, 16 * local_numel(shapes, rank, 2))
        rows.append(row)
    print(md_table(header, rows))
    print()
    s = deltas["single"]
    worst = {k: max(deltas[f"fsdp{r}"][k] for r in range(len(fsdp))) for k in ("train", "whole", "whole_delta")}
    for key, name in (("checkpoint", "final checkpoint"), ("export", "export")):
        per_rank = ", ".join(f"rank {r} {deltas[f'fsdp{r}'][key] / s['train']:.2f}x" for r in range(len(fsdp)))
        print(f"{name} delta / single load+train delta: {per_rank}")
    print(f"whole run (raw peak RSS): max rank / single = {worst['whole'] / s['whole']:.2f}x")
    print(f"whole run delta: max rank / single = {worst['whole_delta'] / s['whole_delta']:.2f}x")
    print(
        f"ratio (load+train peak RSS - baseline, max over ranks / single): {worst['train'] / s['train']:.2f}x "
        f"(theory {16 * local_numel(shapes, 0, 2) / (16 * n_params):.2f}x, target <= 0.60x)"
    )


if __name__ == "__main__":
    main()
