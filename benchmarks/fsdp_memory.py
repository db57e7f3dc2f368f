"""Per-rank peak host memory of FSDP2 with 2 processes vs one plain process (CPU, gloo).

A params + optimizer dominated run: ``finetune`` of one trainable fp32 student of
~161M parameters (the "20m" Wan transformer widened to 10 heads x 64, ffn 2560, 24
blocks: each block ~1/25 of the model, as in real Wan), AdamW, batch 1 of one-token
latents (activations are negligible), 3 iterations. Both runs are real
``train_distill.py`` runs on the same config file:

* single: ``python benchmarks/fsdp_single.py --config run.yaml`` (no accelerate launch:
  one process, no sharding);
* fsdp x2: ``accelerate launch --config_file accelerate_configs/fsdp8.yaml
  --num_processes 2 ... tests/launch/fsdp_cpu.py --config run.yaml`` (the project's
  FSDP2 path; the shim only keeps accelerate's FSDP plugin on CPU).

Each process reports its RSS by phase (benchmarks/fsdp_memhook.py): ``baseline`` is
the RSS just before the models load (torch, accelerate, the process group: about the
same in every process and not what sharding can save); every other column is a phase
peak minus that baseline. ``load+train`` is the peak over loading and all training
iterations (forward, backward, clip, AdamW): what the headline compares. The run's
final checkpoint and the export of the student are reported on their own (they
write / gather full copies). ``theory`` is params + grads + AdamW's two moments, 16
bytes per fp32 parameter held by the process (FSDP2 dim-0 shards, padding included).

Both pairs of runs are made twice, under two glibc malloc settings (fsdp_common.py,
``MALLOC_ENVS``): ``default``, where FSDP2's per-block all-gather / gradient /
reduce-scatter buffers (a few to tens of MiB, allocated and freed every block) end up
in the heap and fragment it, so freed memory stays resident; and ``mmap-1mib``, where
each such buffer is its own mapping returned to the OS when freed, so RSS follows the
live tensors.

    PYTHONPATH=. .venv/bin/python benchmarks/fsdp_memory.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.fsdp_common import (
    MALLOC_ENVS,
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


def summarize(rep: dict) -> dict:
    """Peak RSS deltas (bytes over the pre-load baseline) of one process's report."""
    base, peaks = rep["baseline_rss"], rep["peaks"]

    def delta(phases) -> int | None:
        got = [peaks[p] for p in phases if p in peaks]
        return max(got) - base if got else None

    whole = max([*peaks.values(), rep["ru_maxrss_start"]])
    return {
        "baseline": base,
        "whole": whole,
        "whole_delta": whole - base,
        "load": delta(("load",)),
        "steps": delta(("train",)),
        "train": delta(TRAIN_PHASES),
        "checkpoint": delta(("checkpoint",)),
        "export": delta(("export",)),
    }


COLUMNS = {
    "baseline": "baseline RSS",
    "whole": "peak RSS (raw, whole run)",
    "whole_delta": "whole run delta",
    "load": "load delta",
    "steps": "train-steps delta",
    "train": "load+train delta",
    "checkpoint": "final checkpoint delta",
    "export": "export delta",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=10, help="x 64 = hidden size")
    parser.add_argument("--ffn", type=int, default=2560)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--malloc", nargs="+", choices=sorted(MALLOC_ENVS), default=["default", "mmap-1mib"], help="glibc settings"
    )
    args = parser.parse_args()

    tcfg = big_transformer_config(args.layers, args.heads, args.ffn)
    shapes = param_shapes(tcfg)
    n_params = local_numel(shapes, 0, 1)
    theory = {"single": [16 * n_params], "fsdp x2": [16 * local_numel(shapes, r, 2) for r in range(2)]}
    results: dict[tuple[str, str], list[dict]] = {}
    walls = []
    with tempfile.TemporaryDirectory(prefix="fsdp_memory_") as tmp:
        root = Path(tmp)
        model = build_pipeline(root / "student", tcfg)
        data = write_data(root / "data.parquet")
        config = write_yaml(root / "run.yaml", finetune_config(model, data, root / "out", args.steps))
        for malloc in args.malloc:
            for run, fn in (("single", run_single), ("fsdp x2", run_fsdp)):
                tag = f"{malloc}_{run.replace(' ', '')}"
                reps, wall = fn(
                    config, root / f"mem_{tag}", f"training.output_dir={root / ('out_' + tag)}", malloc=malloc
                )
                results[malloc, run] = [summarize(r) for r in reps]
                walls.append(f"{run} ({malloc}) {wall:.0f} s")

    print(
        f"finetune, fp32 student of {n_params / 1e6:.1f}M params ({n_params * 4 / 2**20:,.0f} MiB) in "
        f"{args.layers} blocks, AdamW, batch 1, {args.steps} iterations. Wall: {', '.join(walls)}."
    )
    print("MiB; delta = peak RSS - RSS just before the models load; theory = 16 bytes per parameter held.")
    print()
    header = ["malloc", "run", "rank", *COLUMNS.values(), "theory: params+grads+Adam"]
    rows = []
    for (malloc, run), ranks in results.items():
        for rank, d in enumerate(ranks):
            rows.append([malloc, run, rank, *(mib(d[k]) for k in COLUMNS), mib(theory[run][rank])])
    print(md_table(header, rows))
    print()
    ideal = theory["fsdp x2"][0] / theory["single"][0]
    lines = []
    for malloc in args.malloc:
        single, fsdp = results[malloc, "single"][0], results[malloc, "fsdp x2"]

        def worst(key: str, fsdp=fsdp, single=single) -> float:
            return max(d[key] for d in fsdp) / single[key]

        print(
            f"[{malloc}] max rank / single: whole run raw peak {worst('whole'):.2f}x, whole run delta "
            f"{worst('whole_delta'):.2f}x, final checkpoint delta {worst('checkpoint'):.2f}x, "
            f"export delta {worst('export'):.2f}x"
        )
        lines.append(f"{malloc} {worst('train'):.2f}x")
    print(
        f"ratio (load+train peak RSS - baseline, max over ranks / single): {', '.join(lines)} "
        f"(theory {ideal:.2f}x, target <= 0.60x)"
    )


if __name__ == "__main__":
    main()
