"""Two real processes on CPU (gloo): DDP and FSDP2, save / resume / export, sharding, equivalence.

FSDP runs go through ``tests/launch/fsdp_cpu.py`` (see ``tests/launching.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import base_config, run_cli, write_config
from launching import TRAIN, backend_launch, launch, straight_then_resumed
from safetensors.torch import load_file


def metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r.pop("iteration"): {k: v for k, v in r.items() if k != "step_time"} for r in rows}


def export_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "export" / "transformer" / "diffusion_pytorch_model.safetensors")


def relative_update_error(a: dict, b: dict, base: dict) -> float:
    """|(a - base) - (b - base)| / |a - base| over all weights: 0 for identical training."""
    diff = sum(((a[k] - b[k]).double() ** 2).sum() for k in base)
    step = sum(((a[k] - base[k]).double() ** 2).sum() for k in base)
    return float((diff / step).sqrt())


@pytest.fixture(scope="module")
def dmd2_reference(tmp_path_factory, tiny_wan, tiny_teacher, latent_data):
    """One process, batch 4: what 2 processes x batch 2 must reproduce."""
    tmp = tmp_path_factory.mktemp("single")
    cfg = dmd2_config(tmp / "out", tiny_wan, tiny_teacher, latent_data, batch=4)
    proc = run_cli("--config", str(write_config(tmp / "run.yaml", cfg)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out"


def dmd2_config(out: Path, model: Path, teacher: Path, data: Path, *, batch: int) -> dict:
    cfg = base_config("dmd2", model, teacher, data, out)
    cfg["training"].update(max_train_steps=6, checkpointing_steps=3, train_batch_size=batch, shuffle=True)
    cfg["method_config"].update(rollout_mode="simulate", generator_update_interval=2)
    # with DMD2's GAN head (a method-owned discriminator on teacher features, real samples from the data)
    cfg["method_config"].update(gan_feature_blocks=[0, 1], gan_generator_weight=0.1, gan_r1_weight=0.5)
    return cfg


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_dmd2_two_processes_save_resume_export_and_match_one(
    backend, tmp_path, tiny_wan, tiny_teacher, latent_data, dmd2_reference
):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    config = write_config(tmp_path / "run.yaml", dmd2_config(straight, tiny_wan, tiny_teacher, latent_data, batch=2))
    report = tmp_path / "shards"
    straight_then_resumed(backend, config, straight, resumed, at=3, env={"SHARD_REPORT": str(report)})

    # exact resume across 2 processes: every logged value of iterations 4..6, and the weights
    a, b = metrics(straight), metrics(resumed)
    assert sorted(b) == [4, 5, 6] and {i: a[i] for i in b} == b
    assert "gan_generator_loss" in a[5] and "grad_norm/discriminator" in a[4]
    wa, wb = export_weights(straight), export_weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # 2 processes x batch 2 == 1 process x batch 4 (same samples, same per-sample noise)
    single = metrics(dmd2_reference)
    for i in (1, 2):
        assert a[i]["total_loss"] == pytest.approx(single[i]["total_loss"], rel=1e-5)
    base = load_file(tiny_wan / "transformer" / "diffusion_pytorch_model.safetensors")
    err = relative_update_error(wa, export_weights(dmd2_reference), base)
    print(f"{backend} dmd2 relative update error vs one process: {err:.2e}")
    assert err < 1e-3

    if backend == "fsdp":  # the shim only reports FSDP runs
        for rank in (0, 1):
            shards = json.loads(Path(f"{report}.rank{rank}.json").read_text())
            assert set(shards) == {"student", "teacher", "critic", "discriminator"}
            for role, (local, total) in shards.items():
                assert 0.4 < local / total < 0.6, (rank, role, local, total)  # about half, teacher included
        assert (straight / "checkpoints" / "checkpoint-6" / "pytorch_model_fsdp_0").is_dir()  # sharded save


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_finetune_two_processes_match_one_with_double_batch(backend, tmp_path, tiny_wan, tiny_teacher, latent_data):
    accelerate_config, script = backend_launch(backend)
    runs = {}
    for name, batch in (("two", 2), ("one", 4)):
        cfg = base_config("finetune", tiny_wan, tiny_teacher, latent_data, tmp_path / name)
        cfg["training"].update(max_train_steps=3, train_batch_size=batch, gradient_accumulation_steps=2)
        path = write_config(tmp_path / f"{name}.yaml", cfg)
        if name == "two":
            launch(accelerate_config, script, "--config", str(path))
        else:
            assert run_cli("--config", str(path)).returncode == 0
        runs[name] = tmp_path / name
    a, b = metrics(runs["two"]), metrics(runs["one"])
    for i in (1, 2, 3):
        assert a[i]["total_loss"] == pytest.approx(b[i]["total_loss"], rel=1e-5)
    base = load_file(tiny_wan / "transformer" / "diffusion_pytorch_model.safetensors")
    assert relative_update_error(export_weights(runs["two"]), export_weights(runs["one"]), base) < 1e-3


def test_num_gpus_must_match_the_launch(tmp_path, tiny_wan, tiny_teacher, latent_data):
    cfg = base_config("finetune", tiny_wan, tiny_teacher, latent_data, tmp_path / "out")
    cfg["training"]["num_gpus"] = 8
    config = str(write_config(tmp_path / "r.yaml", cfg))
    proc = launch("accelerate_configs/ddp8.yaml", TRAIN, "--config", config, check=False)
    assert proc.returncode != 0
    assert "training.num_gpus: is 8 but 2 processes were launched" in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_lora_dmd2_two_processes_resume_and_export(backend, tmp_path, tiny_wan, tiny_teacher, latent_data):
    """LoRA on the student and the critic, EMA on the student: save, resume exactly, export the adapter."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = base_config("dmd2", tiny_wan, tiny_teacher, latent_data, straight)
    cfg["training"].update(max_train_steps=4, checkpointing_steps=2)
    cfg["roles"]["student"].update(lora={"rank": 4, "init": "gaussian"}, ema={"decay": 0.9})
    cfg["roles"]["critic"]["lora"] = {"rank": 4}
    straight_then_resumed(backend, write_config(tmp_path / "run.yaml", cfg), straight, resumed, at=2)
    a, b = metrics(straight), metrics(resumed)
    assert sorted(b) == [3, 4] and {i: a[i] for i in b} == b
    la = load_file(straight / "export" / "pytorch_lora_weights.safetensors")
    lb = load_file(resumed / "export" / "pytorch_lora_weights.safetensors")
    assert la and la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert all("lora" in k for k in la)
    # EMA: DDP ranks hold the same shadow -> written once; FSDP ranks hold shards -> one per rank
    ckpt = straight / "checkpoints" / "checkpoint-4"
    ranks = [torch.load(ckpt / f"rank_state_{r}.pt", weights_only=False)["callbacks"]["ema"] for r in (0, 1)]
    shared = torch.load(ckpt / "shared_state.pt", weights_only=False)["callbacks"]["ema"]
    if backend == "ddp":
        assert ranks == [{}, {}] and shared["student"]["optimization_step"] == 2
    else:
        assert shared == {} and [r["student"]["optimization_step"] for r in ranks] == [2, 2]
        assert not torch.equal(ranks[0]["student"]["shadow"][0], ranks[1]["student"]["shadow"][0])
