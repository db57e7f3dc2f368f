"""Shared pieces of the FSDP host-memory benchmarks (fsdp_memory.py, fsdp_load_rss.py).

Models are ordinary diffusers folders (``build_tiny_wan``) whose transformer is
replaced by a bigger random ``WanTransformer3DModel``; runs are real
``train_distill.py`` runs: one plain process (``benchmarks/fsdp_single.py``) or two
processes under ``accelerate launch`` and the test-only FSDP-on-CPU shim
(``tests/launch/fsdp_cpu.py``), each writing its RSS-by-phase report
(``benchmarks/fsdp_memhook.py``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TQDM_DISABLE", "1")  # save_pretrained's "Writing model shards" bars

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIM = ROOT / "tests" / "launch" / "fsdp_cpu.py"
SINGLE = ROOT / "benchmarks" / "fsdp_single.py"
FSDP_CONFIG = ROOT / "accelerate_configs" / "fsdp8.yaml"
LATENT_SHAPE = (16, 1, 2, 2)  # one latent token after the (1, 2, 2) patch: activations are negligible
MIB = 2**20


def big_transformer_config(num_layers: int, heads: int, ffn_dim: int) -> dict:
    """The "20m" Wan transformer with more / wider blocks (head dim 64, text_dim 32 as the data)."""
    from accel_distill.testing.tiny_wan import tiny_transformer_config

    cfg = tiny_transformer_config("20m")
    cfg.update(num_layers=num_layers, num_attention_heads=heads, ffn_dim=ffn_dim)
    return cfg


def build_pipeline(path: Path, transformer_cfg: dict | None = None, *, seed: int = 0, dtype: str = "fp32") -> Path:
    """A "20m" pipeline folder; with ``transformer_cfg`` its transformer replaced by that (random) one,
    saved in ``dtype`` ("fp32" or "bf16")."""
    import torch
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging

    from accel_distill.testing.tiny_wan import build_tiny_wan

    logging.set_verbosity_error()  # the bf16 save's "modules that should be kept in float32" notice
    build_tiny_wan(path, size="20m", seed=seed)
    if transformer_cfg is not None:
        torch.manual_seed(seed)
        shutil.rmtree(path / "transformer")
        model = WanTransformer3DModel(**transformer_cfg)
        model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).save_pretrained(path / "transformer")
    return path


def param_shapes(transformer_cfg: dict) -> list[tuple[int, ...]]:
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    with init_empty_weights():
        model = WanTransformer3DModel(**transformer_cfg)
    return [tuple(p.shape) for p in model.parameters()]


def local_numel(shapes: list[tuple[int, ...]], rank: int, world: int) -> int:
    """Elements of FSDP2's dim-0 shard on ``rank`` (torch.chunk sizes: ceil(n / world) rows each)."""
    total = 0
    for shape in shapes:
        rows = shape[0] if shape else 1
        chunk = math.ceil(rows / world)
        mine = max(0, min(chunk, rows - rank * chunk))
        total += mine * (math.prod(shape[1:]) if len(shape) > 1 else 1)
    return total


def write_data(path: Path) -> Path:
    from accel_distill.testing.datasets import write_synthetic_dataset

    return write_synthetic_dataset(path, num_samples=16, latent_shape=LATENT_SHAPE, text_len=8, text_dim=32)


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# glibc malloc: "default" (the threshold above which a block is mmapped -- and given back to the OS
# when freed -- grows with every freed block up to 32 MiB, so FSDP's per-block buffers of a few MiB to
# tens of MiB land in the heap and fragment it), or "mmap-1mib" (fixed 1 MiB threshold: every tensor of
# 1 MiB or more is its own mapping, unmapped when freed, so RSS follows the live tensors).
MALLOC_ENVS: dict[str, dict[str, str]] = {
    "default": {},
    "mmap-1mib": {"MALLOC_MMAP_THRESHOLD_": str(2**20)},
}


def _env(report: Path, malloc: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    return {
        **env,
        **MALLOC_ENVS[malloc],
        "PYTHONPATH": str(ROOT),
        "MEM_REPORT": str(report),
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }


def _run(cmd: list[str], report: Path, ranks: int, malloc: str) -> tuple[list[dict], float]:
    start = time.perf_counter()
    env = _env(report, malloc)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(cmd)}")
    return [json.loads(Path(f"{report}.rank{r}.json").read_text()) for r in range(ranks)], wall


def run_single(config: Path, report: Path, *overrides: str, malloc: str = "default") -> tuple[list[dict], float]:
    """``train_distill.py --config`` in one plain process (no accelerate launch)."""
    return _run([sys.executable, str(SINGLE), "--config", str(config), *overrides], report, 1, malloc)


def run_fsdp(
    config: Path, report: Path, *overrides: str, processes: int = 2, malloc: str = "default"
) -> tuple[list[dict], float]:
    """``accelerate launch`` (fsdp8.yaml, FSDP2) with ``processes`` CPU processes through the shim."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG)]
    cmd += ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--main_process_port", str(free_port()), str(SHIM), "--config", str(config), *overrides]
    return _run(cmd, report, processes, malloc)


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:,.0f}"


def md_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
