"""Wan2.2 A14B-style two-expert models: routing by timestep, both experts train, export, stock sampling.

Tiny pipelines with ``transformer`` (high noise, t >= boundary_ratio * 1000) and
``transformer_2`` (low noise), built from diffusers configs and loaded through
``from_pretrained`` like a Hub id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import base_config, metrics_by_iteration, read_metrics, run_cli, write_config
from safetensors.torch import load_file

from accel_distill.builder import build_runtime
from accel_distill.config import load_config
from accel_distill.schedule import fit_few_step_schedule
from accel_distill.testing.tiny_wan import build_tiny_wan, perturb_transformer

BOUNDARY = 0.875  # Wan2.2 T2V-A14B's


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    return build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-moe", boundary_ratio=BOUNDARY)


@pytest.fixture(scope="module")
def moe_teacher(tmp_path_factory) -> Path:
    path = build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-moe-teacher", boundary_ratio=BOUNDARY)
    for i, sub in enumerate(("transformer", "transformer_2")):
        perturb_transformer(path, scale=0.05, seed=7 + i, subfolder=sub)
    return path


def expert_weights(folder: Path, key: str) -> dict[str, torch.Tensor]:
    return load_file(folder / key / "diffusion_pytorch_model.safetensors")


def changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_each_sample_reaches_the_expert_its_timestep_selects(tmp_path, moe, moe_teacher, latent_data):
    """t >= 875 -> transformer, below -> transformer_2, per sample; a straddling batch is split and rejoined."""
    cfg = base_config("dmd2", moe, moe_teacher, latent_data, tmp_path / "out")
    rt = build_runtime(load_config(str(write_config(tmp_path / "run.yaml", cfg))))
    teacher, adapter = rt.bundle["teacher"], rt.adapter
    assert adapter.boundary_timestep == pytest.approx(875.0)
    seen: dict[str, list[float]] = {"transformer": [], "transformer_2": []}
    for key, module in teacher.modules.items():
        module.register_forward_pre_hook(
            lambda m, a, kw, key=key: seen[key].extend(kw["timestep"].tolist()), with_kwargs=True
        )
    batch = next(iter(rt.stream))
    x = adapter.normalize_latents(batch["latents"])
    cond = adapter.conditioning(batch)
    t = torch.tensor([990.0, 100.0])  # one sample per expert in one batch
    with torch.no_grad():
        routed = adapter.predict(teacher, x, t, cond)
    assert seen == {"transformer": [990.0], "transformer_2": [100.0]}
    with torch.no_grad():
        alone = [
            adapter._forward(
                teacher.modules[k], teacher.dtype, x[i : i + 1], t[i : i + 1], {"text": cond["text"][i : i + 1]}
            )
            for i, k in enumerate(("transformer", "transformer_2"))
        ]
    torch.testing.assert_close(routed, torch.cat(alone).float(), rtol=0, atol=0)
    # the boundary itself belongs to the high-noise expert, as in WanPipeline (t >= boundary)
    seen["transformer"].clear()
    seen["transformer_2"].clear()
    with torch.no_grad():
        adapter.predict(teacher, x, torch.tensor([875.0, 874.9]), cond)
    assert seen == {"transformer": [875.0], "transformer_2": [pytest.approx(874.9)]}


def test_finetune_trains_both_experts_each_with_its_own_optimizer(tmp_path, moe, moe_teacher, latent_data):
    out = tmp_path / "out"
    cfg = base_config("finetune", moe, moe_teacher, latent_data, out)
    cfg["training"].update(max_train_steps=6, checkpointing_steps=3, train_batch_size=4)
    assert (proc := run_cli("--config", str(write_config(tmp_path / "ft.yaml", cfg)))).returncode == 0, proc.stderr[
        -3000:
    ]
    rows = read_metrics(out)
    assert {"grad_norm/student.transformer", "grad_norm/student.transformer_2", "lr/student.transformer_2"} <= set(
        rows[-1]
    )
    roles = json.loads((out / "checkpoints" / "checkpoint-6" / "roles.json").read_text())
    assert roles["models"] == ["student.transformer", "student.transformer_2"]
    export = out / "export"
    for key in ("transformer", "transformer_2"):  # both experts moved
        assert changed(expert_weights(export, key), expert_weights(moe, key)), key
    index = json.loads((export / "model_index.json").read_text())
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"] and index["boundary_ratio"] == BOUNDARY


STOCK_SAMPLER = textwrap.dedent(
    """
    import sys, torch
    from diffusers import WanPipeline
    folder, embeds, result = sys.argv[1:4]
    pipe = WanPipeline.from_pretrained(folder)
    seen = {"transformer": [], "transformer_2": []}
    for key in seen:
        getattr(pipe, key).register_forward_pre_hook(
            lambda m, a, kw, key=key: seen[key].append(float(kw["timestep"][0])), with_kwargs=True
        )
    torch.manual_seed(123)
    latents = pipe(
        prompt_embeds=torch.load(embeds), num_inference_steps=3, guidance_scale=1.0, guidance_scale_2=1.0,
        height=32, width=32, num_frames=5, output_type="latent", generator=torch.Generator().manual_seed(0),
    ).frames
    assert not any(m.startswith("accel_distill") for m in sys.modules)
    torch.save({"latents": latents, "seen": seen}, result)
    """
)


def test_dmd2_two_experts_export_sampled_by_stock_wan_pipeline(tmp_path, moe, moe_teacher, text_data):
    """Student, teacher and critic are all two-expert; the export keeps transformer_2 and boundary_ratio,
    stock WanPipeline calls both experts at the trained timesteps and its latents equal our sampler's."""
    out = tmp_path / "out"
    cfg = base_config("dmd2", moe, moe_teacher, text_data, out)
    cfg["method_config"]["rollout_mode"] = "simulate"
    cfg["pipeline_config"].update(num_frames=5, height=32, width=32)
    cfg["training"].update(max_train_steps=4)
    assert (proc := run_cli("--config", str(write_config(tmp_path / "dmd2.yaml", cfg)))).returncode == 0, proc.stderr[
        -3000:
    ]
    roles = json.loads((out / "checkpoints" / "checkpoint-4" / "roles.json").read_text())
    units = ["student.transformer", "student.transformer_2", "critic.transformer", "critic.transformer_2"]
    assert roles["models"] == units  # the frozen teacher's experts are never saved
    index = json.loads((out / "export" / "model_index.json").read_text())
    assert index["boundary_ratio"] == BOUNDARY and index["transformer_2"][0] == "diffusers"

    embeds = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(5))
    torch.save(embeds, tmp_path / "embeds.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [str(out / "export"), str(tmp_path / "embeds.pt"), str(tmp_path / "r.pt")]
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_SAMPLER, *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = torch.load(tmp_path / "r.pt")
    schedule = fit_few_step_schedule([1000, 757, 522])
    high = [t for t in schedule.timesteps if t >= BOUNDARY * 1000]
    low = [t for t in schedule.timesteps if t < BOUNDARY * 1000]
    assert stock["seen"] == {"transformer": high, "transformer_2": low} and high and low

    from diffusers import WanTransformer3DModel

    from accel_distill.sampling import few_step_sample

    experts = {k: WanTransformer3DModel.from_pretrained(out / "export", subfolder=k) for k in stock["seen"]}

    def predict(x, t):
        model = experts["transformer" if float(t[0]) >= BOUNDARY * 1000 else "transformer_2"]
        return model(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]

    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    with torch.no_grad():
        ours = few_step_sample(predict, schedule, noise)
    assert torch.equal(ours, stock["latents"])


def test_lora_and_ema_per_expert_resume_bitwise(tmp_path, moe, moe_teacher, latent_data):
    """One LoRA adapter and one EMA per expert; 4 straight == 2 + resume + 2; the export writes one
    LoRA file per expert, each loadable by stock load_lora_weights (the low-noise one into transformer_2)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = base_config("finetune", moe, moe_teacher, latent_data, straight)
    cfg["roles"]["student"].update(lora={"rank": 4, "init": "gaussian"}, ema={"decay": 0.5})
    cfg["training"].update(max_train_steps=4, checkpointing_steps=2, learning_rate=1e-3)
    path = write_config(tmp_path / "run.yaml", cfg)
    assert (proc := run_cli("--config", str(path))).returncode == 0, proc.stderr[-3000:]
    ckpt = straight / "checkpoints" / "checkpoint-2"
    proc = run_cli("--config", str(path), f"training.output_dir={resumed}", f"training.resume_from_checkpoint={ckpt}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = metrics_by_iteration(straight), metrics_by_iteration(resumed)
    keys = ("total_loss", "grad_norm/student.transformer", "grad_norm/student.transformer_2")
    assert {i: [a[i][k] for k in keys] for i in (3, 4)} == {i: [b[i][k] for k in keys] for i in (3, 4)}
    assert "ema_decay/student.transformer_2" in a[4]
    info = json.loads((straight / "export" / "accel_distill_export.json").read_text())
    assert info["lora_files"] == {
        "transformer": "pytorch_lora_weights.safetensors",
        "transformer_2": "pytorch_lora_weights_transformer_2.safetensors",
    }
    for name in info["lora_files"].values():
        sa, sb = load_file(straight / "export" / name), load_file(resumed / "export" / name)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(moe)
    before = {k: dict(getattr(pipe, k).named_parameters()) for k in ("transformer", "transformer_2")}
    before = {k: {n: p.detach().clone() for n, p in v.items()} for k, v in before.items()}
    pipe.load_lora_weights(straight / "export", weight_name=info["lora_files"]["transformer"], adapter_name="high")
    pipe.load_lora_weights(
        straight / "export",
        weight_name=info["lora_files"]["transformer_2"],
        adapter_name="low",
        load_into_transformer_2=True,
    )
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
    assert any("lora" in n for n, _ in pipe.transformer_2.named_parameters())
    high = load_file(straight / "export" / info["lora_files"]["transformer"])
    low = load_file(straight / "export" / info["lora_files"]["transformer_2"])
    assert any(not torch.equal(high[k], low[k]) for k in high)  # two adapters, one per expert


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda c, bad: c["pipeline_config"].update(boundary_ratio=1.5), ["pipeline_config.boundary_ratio:", "(0, 1)"]),
        (lambda c, bad: c["roles"]["student"].update(path=str(bad)), ["roles.student.path:", "differ"]),
        (
            lambda c, bad: c["roles"]["student"].update(lora={"rank": 2, "target_modules": ["to_q", "expert_only"]}),
            ["roles.student.lora.target_modules:", "expert_only"],
        ),
    ],
    ids=["boundary-outside", "experts-differ", "lora-target-missing"],
)
def test_bad_two_expert_input_is_one_line_before_training(tmp_path, moe, moe_teacher, latent_data, mutate, words):
    from diffusers import WanTransformer3DModel

    from accel_distill.testing.tiny_wan import tiny_transformer_config

    bad = build_tiny_wan(tmp_path / "bad", boundary_ratio=BOUNDARY)
    WanTransformer3DModel(**{**tiny_transformer_config(), "num_layers": 1}).save_pretrained(bad / "transformer_2")
    out = tmp_path / "out"
    cfg = base_config("finetune", moe, moe_teacher, latent_data, out)
    mutate(cfg, bad)
    proc = run_cli("--config", str(write_config(tmp_path / "run.yaml", cfg)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert all(w in lines[-1] for w in words), lines[-1]
    assert not (out / "checkpoints").exists()


def test_fsdp_two_processes_shard_both_experts_of_every_role(tmp_path, moe, moe_teacher, text_data):
    """2 CPU processes, FSDP2: each expert of student, teacher and critic is split across the ranks,
    and a DMD2 run over both experts saves, resumes bitwise and exports them."""
    from launching import straight_then_resumed

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = base_config("dmd2", moe, moe_teacher, text_data, straight)
    cfg["method_config"]["rollout_mode"] = "simulate"
    cfg["pipeline_config"].update(num_frames=5, height=32, width=32)
    cfg["training"].update(max_train_steps=4, checkpointing_steps=2, train_batch_size=1)
    config = write_config(tmp_path / "run.yaml", cfg)
    report = tmp_path / "shards"
    straight_then_resumed("fsdp", config, straight, resumed, at=2, env={"SHARD_REPORT": str(report)})
    for rank in (0, 1):
        shards = json.loads(Path(f"{report}.rank{rank}.json").read_text())
        assert set(shards) == {
            f"{r}.{k}" for r in ("student", "teacher", "critic") for k in ("transformer", "transformer_2")
        }
        for unit, (local, total) in shards.items():
            assert 0.4 < local / total < 0.6, (rank, unit, local, total)

    def losses(out):
        return {i: r["total_loss"] for i, r in metrics_by_iteration(out).items()}

    assert {i: losses(straight)[i] for i in (3, 4)} == losses(resumed)
    for key in ("transformer", "transformer_2"):
        a, b = expert_weights(straight / "export", key), expert_weights(resumed / "export", key)
        assert all(torch.equal(a[k], b[k]) for k in a)
