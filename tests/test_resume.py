"""Exact resume and checkpoint safety, through the CLI."""

from __future__ import annotations

import shutil

import torch
from conftest import base_config, read_metrics, run_cli, write_config
from safetensors.torch import load_file


def losses(out) -> dict[int, dict]:
    rows = read_metrics(out)
    keep = ("total_loss", "critic_loss", "dmd_loss", "grad_norm/student", "grad_norm/critic", "lr/student", "lr/critic")
    return {r["iteration"]: {k: r[k] for k in keep if k in r} for r in rows}


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(path / "transformer" / "diffusion_pytorch_model.safetensors")


def test_dmd2_resume_is_bitwise_exact(tmp_path, tiny_wan, tiny_teacher, latent_data):
    """12 iterations straight == 6 + resume + 6: shuffle on, interval 2, simulate rollouts,
    gradient accumulation, a decaying LR schedule, crossing an epoch boundary."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = base_config("dmd2", tiny_wan, tiny_teacher, latent_data, straight)
    cfg["training"].update(
        max_train_steps=12, checkpointing_steps=6, gradient_accumulation_steps=2, lr_scheduler="cosine", shuffle=True
    )
    cfg["method_config"].update(rollout_mode="simulate", generator_update_interval=2)
    path = write_config(tmp_path / "run.yaml", cfg)
    proc = run_cli("--config", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]

    ckpt = straight / "checkpoints" / "checkpoint-6"
    proc = run_cli("--config", str(path), f"training.output_dir={resumed}", f"training.resume_from_checkpoint={ckpt}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(7, 13))
    assert {i: a[i] for i in b} == b  # every logged float identical, dmd iterations included
    assert any("dmd_loss" in b[i] for i in b)
    wa, wb = weights(straight / "export"), weights(resumed / "export")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the critic and optimizer states too (accelerate's second model / optimizer files)
    last_a, last_b = straight / "checkpoints" / "checkpoint-12", resumed / "checkpoints" / "checkpoint-12"
    ca, cb = load_file(last_a / "model_1.safetensors"), load_file(last_b / "model_1.safetensors")
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


def test_latest_skips_unfinished_checkpoints_and_resume_latest_continues(tmp_path, tiny_wan, tiny_teacher, latent_data):
    out = tmp_path / "out"
    cfg = base_config("finetune", tiny_wan, tiny_teacher, latent_data, out)
    cfg["training"].update(max_train_steps=2, checkpointing_steps=2)
    path = write_config(tmp_path / "run.yaml", cfg)
    assert run_cli("--config", str(path)).returncode == 0
    # a checkpoint killed half-way: still in its temporary folder, never named checkpoint-N
    shutil.copytree(out / "checkpoints" / "checkpoint-2", out / "checkpoints" / ".tmp-checkpoint-3")
    (out / "checkpoints" / ".tmp-checkpoint-3" / "model.safetensors").write_bytes(b"truncated")
    proc = run_cli("--config", str(path), "training.max_train_steps=4", "training.resume_from_checkpoint=latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(out)) == [1, 2, 3, 4]  # 3 and 4 continue from checkpoint-2
    assert (out / "checkpoints" / "checkpoint-4").is_dir()


def test_resume_with_different_roles_is_refused(tmp_path, tiny_wan, tiny_teacher, latent_data):
    out = tmp_path / "out"
    cfg = base_config("finetune", tiny_wan, tiny_teacher, latent_data, out)
    cfg["training"].update(max_train_steps=2, checkpointing_steps=2)
    assert run_cli("--config", str(write_config(tmp_path / "ft.yaml", cfg))).returncode == 0
    dmd = base_config("dmd2", tiny_wan, tiny_teacher, latent_data, tmp_path / "dmd")
    dmd["training"]["resume_from_checkpoint"] = str(out / "checkpoints" / "checkpoint-2")
    proc = run_cli("--config", str(write_config(tmp_path / "dmd.yaml", dmd)))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint holds roles ['student']" in lines[0], proc.stderr
