"""Models, data, run configs and the subprocess runner of ``gpu_acceptance.py``.

Each run is a YAML file and a child process (``gpu_acceptance_child.py``): one
Accelerator per process, as on one GPU, and the child measures its own peak memory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks.gpu_acceptance_child import COMPILE_BACKEND_ENV, ROOT

CPU_COMPILE_BACKEND = "aot_eager"  # inductor's C++ code generation alone takes ~90 s on 2 cores

# WanTransformer3DModel config of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (transformer/config.json; the same
# values as diffusers' scripts/convert_wan_to_diffusers.py "Wan-T2V-1.3B": dim 12 x 128 = 1536).
WAN21_T2V_1_3B = {
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 12,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "pos_embed_seq_len": None,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}

GIB = 2**30
CAPTIONS = ["a red cat", "two blue dog", "a video of a handwritten digit"]


@dataclass(frozen=True)
class Mode:
    """What one acceptance run uses: the transformer, the feature-run video, the timing sizes."""

    name: str
    transformer: dict
    text_max_length: int
    batch_size: int  # feature runs
    feature_latent: tuple[int, int, int, int]  # [C, T, H, W] of the feature runs and the sampling check
    timing_sizes: dict[str, tuple[int, int, int]]  # label -> (frames, height, width)
    matrix_size: str  # the size timed with every attention backend x compile off/on (the others: native, off)
    timing_warmup: int
    timing_iters: int  # a whole number of generator_update_interval cycles
    skipped_sizes: dict[str, str] = field(default_factory=dict)  # label -> why not timed


LARGE, SMALL = "61x448x832", "29x256x448"
TIMING_INTERVAL = 5  # configs/wan/dmd2_t2v_1.3b.yaml: the student steps every 5 iterations
TIMING_BATCH = 1  # samples per iteration (the recipe's train_batch_size)


def make_mode(tiny: bool) -> Mode:
    from accel_distill.testing.tiny_wan import tiny_transformer_config

    if tiny:
        return Mode(
            name="tiny",
            transformer=tiny_transformer_config("tiny"),
            text_max_length=16,
            batch_size=2,
            feature_latent=(16, 2, 4, 4),
            timing_sizes={"5x32x32": (5, 32, 32)},
            matrix_size="5x32x32",
            timing_warmup=2,
            timing_iters=TIMING_INTERVAL,
            skipped_sizes={LARGE: "--tiny: this size is timed with the 1.3B-shaped transformer, on a GPU"},
        )
    return Mode(
        name="wan2.1-t2v-1.3b",
        transformer=dict(WAN21_T2V_1_3B),
        text_max_length=512,
        batch_size=2,
        feature_latent=(16, 2, 8, 8),
        timing_sizes={LARGE: (61, 448, 832), SMALL: (29, 256, 448)},
        matrix_size=LARGE,
        timing_warmup=2,  # iteration 0 updates the student, 1 only the critic: every graph compiles in these
        timing_iters=TIMING_INTERVAL,
    )


def build_assets(root: Path, mode: Mode) -> dict[str, Path]:
    """The random-weight pipeline folder, latent and text-only parquet data, validation prompts, embeds."""
    import torch

    from accel_distill.testing.datasets import write_synthetic_dataset
    from accel_distill.testing.tiny_wan import build_tiny_wan

    root.mkdir(parents=True, exist_ok=True)
    text_dim = mode.transformer["text_dim"]
    model = root / "models" / mode.name
    built = differing_keys(model, mode.transformer) != []  # else reused: a rerun into the same folder
    if built:
        tmp = model.with_name(f".{model.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_wan(tmp, seed=0, transformer_config=mode.transformer)
        shutil.rmtree(model, ignore_errors=True)
        tmp.rename(model)  # a folder is complete or absent
    latents = write_synthetic_dataset(
        root / "data" / "latents.parquet", num_samples=8, latent_shape=mode.feature_latent, text_dim=text_dim
    )
    text = write_synthetic_dataset(root / "data" / "text.parquet", num_samples=8, latent_shape=None, text_dim=text_dim)
    prompts = root / "data" / "validation.json"
    prompts.write_text(json.dumps({"data": [{"caption": c} for c in CAPTIONS[:2]]}))
    embeds = root / "data" / "sample_embeds.pt"
    torch.save(torch.randn(1, mode.text_max_length, text_dim, generator=torch.Generator().manual_seed(5)), embeds)
    return {"model": model, "latents": latents, "text": text, "prompts": prompts, "embeds": embeds, "built": built}


def differing_keys(model: Path, config: dict) -> list[str] | None:
    """Keys of ``config`` the saved transformer config differs in; None when there is no saved model."""
    path = model / "transformer" / "config.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return [k for k, v in config.items() if saved.get(k) != (list(v) if isinstance(v, tuple) else v)]


def video_size(latent: tuple[int, ...]) -> dict:
    """pipeline_config num_frames / height / width of a latent [C, T, H, W] (Wan VAE: 4x time, 8x space)."""
    return {"num_frames": (latent[1] - 1) * 4 + 1, "height": latent[2] * 8, "width": latent[3] * 8}


def _training(out: Path, data: Path, mode: Mode, **extra) -> dict:
    return {
        "output_dir": str(out),
        "data_path": str(data),
        "seed": 3,
        "max_train_steps": 4,
        "train_batch_size": mode.batch_size,
        "learning_rate": 1e-3,
        "checkpointing_steps": 2,
        "dataloader_num_workers": 0,
        "mixed_precision": "bf16",
        "log_every": 1,
        **extra,
    }


def _validation(assets: dict[str, Path], **extra) -> dict:
    return {
        "log_validation": True,
        "validation_steps": 2,
        "validation_dataset_file": str(assets["prompts"]),
        **extra,
    }


LORA = {"rank": 8, "alpha": 8, "init": "gaussian"}


def finetune_config(out: Path, assets: dict[str, Path], mode: Mode) -> dict:
    """LoRA student with EMA, validation, checkpoints every 2 of 4 iterations, bf16."""
    model = str(assets["model"])
    return {
        "recipe": {"family": "wan", "method": "finetune"},
        "roles": {"student": {"path": model, "trainable": True, "lora": LORA, "ema": {"decay": 0.9}}},
        "training": _training(out, assets["latents"], mode, **_validation(assets, validation_sampling_steps=[4])),
        "pipeline_config": {
            "flow_shift": 3.0,
            "text_max_length": mode.text_max_length,
            **video_size(mode.feature_latent),
        },
        "method_config": {"timestep_sampling": "logit_normal", "pred_type": "flow", "cfg_dropout_rate": 0.5},
    }


def dmd2_config(out: Path, assets: dict[str, Path], mode: Mode) -> dict:
    """LoRA student (EMA, merged export) and LoRA critic, bf16 teacher, data-free rollouts, validation."""
    model = str(assets["model"])
    return {
        "recipe": {"family": "wan", "method": "dmd2"},
        "roles": {
            "student": {
                "path": model,
                "trainable": True,
                "lora": {**LORA, "export_merged": True},
                "ema": {"decay": 0.9},
            },
            "teacher": {"path": model, "trainable": False, "precision": "bf16"},
            "critic": {"path": model, "trainable": True, "lora": LORA, "betas": [0.0, 0.99]},
        },
        "training": _training(out, assets["text"], mode, **_validation(assets)),
        "pipeline_config": {
            "flow_shift": 3.0,
            "text_max_length": mode.text_max_length,
            **video_size(mode.feature_latent),
        },
        "method_config": {
            "rollout_mode": "simulate",
            "dmd_denoising_steps": [1000, 757, 522],
            "generator_update_interval": 2,
            "real_score_guidance_scale": 3.0,
        },
    }


def timing_config(
    out: Path, assets: dict[str, Path], mode: Mode, size: tuple[int, int, int], attention: str, compile_: bool
) -> dict:
    """configs/wan/dmd2_t2v_1.3b.yaml's recipe (full-parameter student and critic, gradient checkpointing,
    bf16 teacher, simulate rollouts, interval 5, CFG 4.5), batch 1, on random weights and text-only data."""
    model = str(assets["model"])
    frames, height, width = size
    trainable = {"trainable": True, "gradient_checkpointing": True}
    return {
        "recipe": {"family": "wan", "method": "dmd2"},
        "roles": {
            "student": {"path": model, **trainable},
            "teacher": {"path": model, "trainable": False, "precision": "bf16"},
            "critic": {"path": model, **trainable, "learning_rate": 1e-5, "betas": [0.0, 0.999]},
        },
        "training": {
            "output_dir": str(out),
            "data_path": str(assets["text"]),
            "seed": 1000,
            "max_train_steps": 1_000_000,
            "train_batch_size": TIMING_BATCH,
            "learning_rate": 1e-5,
            "betas": [0.0, 0.999],
            "weight_decay": 0.01,
            "max_grad_norm": 1.0,
            "checkpointing_steps": 1_000_000,
            "dataloader_num_workers": 2,
            "mixed_precision": "bf16",
            "attention_backend": attention,
            "compile": compile_,
        },
        "pipeline_config": {
            "flow_shift": 8.0,
            "text_max_length": mode.text_max_length,
            "num_frames": frames,
            "height": height,
            "width": width,
        },
        "method_config": {
            "rollout_mode": "simulate",
            "dmd_denoising_steps": [1000, 757, 522],
            "generator_update_interval": TIMING_INTERVAL,
            "real_score_guidance_scale": 4.5,
        },
    }


def write_yaml(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --- child processes ------------------------------------------------------------------


@dataclass
class Job:
    """One child process: ``gpu_acceptance_child <command> <report> <args>``."""

    name: str
    command: str
    args: list[str]
    folder: Path
    rc: int | None = None
    seconds: float = 0.0
    stderr_tail: str = ""
    report: dict = field(default_factory=dict)

    @property
    def report_file(self) -> Path:
        return self.folder / f"{self.name}.report.json"

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.report.get("rc") == 0

    def error(self) -> str:
        """Why the child failed: its report's reason, else the last meaningful stderr line (the error)."""
        if self.rc == 0 and self.report.get("error"):
            return self.report["error"]
        lines = [line.strip() for line in self.stderr_tail.splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith(("warnings.warn", "train:", "  "))]
        return f"exit {self.rc}: {lines[-1][:300] if lines else 'no stderr'}"


def child_env(device: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_MIXED_PRECISION", None)  # no launcher here: the run YAML says bf16
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the library picks CUDA whenever torch sees one
        env[COMPILE_BACKEND_ENV] = CPU_COMPILE_BACKEND
    return env


def run_jobs(jobs: list[Job], device: str, parallel: int, timeout: float) -> None:
    """Run ``jobs`` (at most ``parallel`` at once), filling in rc, seconds, stderr and the report."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            job.folder.mkdir(parents=True, exist_ok=True)
            job.report_file.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "benchmarks.gpu_acceptance_child", job.command, str(job.report_file)]
            log = open(job.folder / f"{job.name}.stderr.txt", "w+")  # noqa: SIM115 (closed below)
            proc = subprocess.Popen(
                cmd + job.args,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=child_env(device),
                cwd=ROOT,
            )
            running.append((job, proc, log, time.perf_counter()))
        time.sleep(0.2)
        for item in list(running):
            job, proc, log, start = item
            elapsed = time.perf_counter() - start
            if proc.poll() is None and elapsed < timeout:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            job.rc, job.seconds = proc.returncode, elapsed
            log.seek(0)
            job.stderr_tail = log.read()[-6000:]
            log.close()
            if job.report_file.exists():
                job.report = json.loads(job.report_file.read_text())
            running.remove(item)


def peak(job: Job) -> str:
    r = job.report
    if r.get("peak_gpu_bytes") is not None:
        return f"peak GPU {r['peak_gpu_bytes'] / GIB:.2f} GiB"
    return f"peak RSS {r.get('peak_rss_bytes', 0) / GIB:.2f} GiB" if r else "no report"


def train_job(name: str, config: Path, folder: Path, *overrides: str) -> Job:
    return Job(name, "train", ["--", "--config", str(config), *overrides], folder)


def metrics(out: Path) -> list[dict]:
    path = out / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


LOSS_KEYS = ("total_loss", "flow_loss", "dmd_loss", "critic_loss")


def compare_losses(straight: list[dict], resumed: list[dict], exact: bool) -> tuple[bool, str]:
    """Every loss of the resumed iterations against the straight run's: bitwise equal when ``exact`` (CPU),
    else within 1e-3 relative (CUDA backward kernels may accumulate in a different order from run to run;
    the first resumed iteration's forward reads the checkpointed weights, so it is usually bitwise too)."""
    a = {r["iteration"]: r for r in straight}
    worst, shown = 0.0, []
    for row in resumed:
        ref = a.get(row["iteration"])
        if ref is None:
            return False, f"iteration {row['iteration']} is not in the straight run"
        for k in LOSS_KEYS:
            if k not in row and k not in ref:
                continue
            if (k in row) != (k in ref):
                return False, f"iteration {row['iteration']}: {k} logged in one run only"
            x, y = row[k], ref[k]
            rel = 0.0 if x == y else abs(x - y) / max(abs(y), 1e-12)
            if (exact and rel) or not math.isfinite(rel) or rel > 1e-3:
                return False, f"iteration {row['iteration']}: {k} {x!r} != {y!r} (straight)"
            worst = max(worst, rel)
        shown.append(row["iteration"])
    how = "every loss bitwise equal" if worst == 0 else f"losses within {worst:.1e} relative"
    return bool(shown), f"iterations {shown}: {how}"
