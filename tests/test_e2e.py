"""End to end through ``train_distill.py`` in subprocesses, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, base_config, read_metrics, run_cli, write_config
from safetensors.torch import load_file

from accel_distill.sampling import few_step_sample
from accel_distill.schedule import fit_few_step_schedule


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def exported_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "export" / "transformer" / "diffusion_pytorch_model.safetensors")


def test_finetune_trains_checkpoints_and_exports(tmp_path, tiny_wan, tiny_teacher, latent_data):
    out = tmp_path / "out"
    cfg = base_config("finetune", tiny_wan, tiny_teacher, latent_data, out)
    cfg["method_config"] = {"timestep_sampling": "logit_normal", "pred_type": "x0", "cfg_dropout_rate": 0.5}
    proc = run_cli("--config", str(write_config(tmp_path / "ft.yaml", cfg)), "training.checkpoints_total_limit=1")
    assert_ok(proc)
    rows = read_metrics(out)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert all("flow_loss" in r and "grad_norm/student" in r for r in rows)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-4"]  # rotation
    # a many-step student keeps its source scheduler and the untouched components
    index = json.loads((out / "export" / "model_index.json").read_text())
    assert index["scheduler"] == json.loads((tiny_wan / "model_index.json").read_text())["scheduler"]
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for f in (tiny_wan / part).iterdir():
            assert (out / "export" / part / f.name).read_bytes() == f.read_bytes()
    trained, base = exported_weights(out), load_file(tiny_wan / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in base)


def test_finetune_through_accelerate_launch(tmp_path, tiny_wan, tiny_teacher, latent_data):
    out = tmp_path / "out"
    cfg = base_config("finetune", tiny_wan, tiny_teacher, latent_data, out)
    cfg["training"]["max_train_steps"] = 2
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--cpu"]
    proc = subprocess.run(
        [*launch, str(ROOT / "train_distill.py"), "--config", str(write_config(tmp_path / "ft.yaml", cfg))],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert_ok(proc)
    assert (out / "export" / "transformer").is_dir()


STOCK_SAMPLER = textwrap.dedent(
    """
    import sys, torch
    from diffusers import WanPipeline
    folder, embeds, result = sys.argv[1:4]
    pipe = WanPipeline.from_pretrained(folder)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(float(kw["timestep"][0])), with_kwargs=True)
    torch.manual_seed(123)
    latents = pipe(
        prompt_embeds=torch.load(embeds), num_inference_steps=3, guidance_scale=1.0, height=32, width=32,
        num_frames=5, output_type="latent", generator=torch.Generator().manual_seed(0),
    ).frames
    assert not any(m.startswith("accel_distill") for m in sys.modules)
    torch.save({"latents": latents, "timesteps": seen, "scheduler": type(pipe.scheduler).__name__}, result)
    """
)


STOCK_SCHEDULERS = {"sde": "FlowMatchLCMScheduler", "ode": "FlowMatchEulerDiscreteScheduler"}


@pytest.mark.parametrize(("mode", "sampler"), [("data", "sde"), ("simulate", "sde"), ("simulate", "ode")])
def test_dmd2_trains_and_stock_diffusers_samples_the_export(
    mode, sampler, tmp_path, tiny_wan, tiny_teacher, latent_data, text_data
):
    """Train, export, and stock WanPipeline samples the export at the trained timesteps with latents
    equal to our sampler's, for each pipeline_config.sampler_kind (sde: LCM re-noising, ode: Euler)."""
    out = tmp_path / "out"
    cfg = base_config("dmd2", tiny_wan, tiny_teacher, latent_data if mode == "data" else text_data, out)
    cfg["method_config"]["rollout_mode"] = mode
    cfg["pipeline_config"]["sampler_kind"] = sampler
    if mode == "simulate":  # text-only data: the video size comes from the config
        cfg["pipeline_config"].update(num_frames=5, height=32, width=32)
    assert_ok(run_cli("--config", str(write_config(tmp_path / "dmd2.yaml", cfg))))

    rows = read_metrics(out)
    assert ["dmd_loss" in r for r in rows] == [True, False, True, False]  # interval 2
    assert all(r["skipped_steps"] == 0 for r in rows)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    roles = json.loads((out / "checkpoints" / "checkpoint-4" / "roles.json").read_text())
    assert roles["models"] == ["student", "critic"]  # the frozen teacher is never saved
    # the export holds exactly the trained student (accelerate's first saved model)
    student = load_file(out / "checkpoints" / "checkpoint-4" / "model.safetensors")
    exported = exported_weights(out)
    assert student.keys() == exported.keys() and all(torch.equal(student[k], exported[k]) for k in student)
    info = json.loads((out / "export" / "accel_distill_export.json").read_text())
    assert info["method"] == "dmd2"  # provenance: how the student was distilled travels with it
    assert info["method_config"]["rollout_mode"] == mode
    assert info["method_config"]["real_score_guidance_scale"] == cfg["method_config"]["real_score_guidance_scale"]

    embeds = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(5))
    torch.save(embeds, tmp_path / "embeds.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_SAMPLER, str(out / "export"), str(tmp_path / "embeds.pt"), str(tmp_path / "r.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert_ok(proc)
    stock = torch.load(tmp_path / "r.pt")
    schedule = fit_few_step_schedule([1000, 757, 522], kind=sampler)
    assert stock["scheduler"] == STOCK_SCHEDULERS[sampler] == info["scheduler"]["class"]
    assert stock["timesteps"] == list(schedule.timesteps)  # exactly what the student trained on

    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(out / "export", subfolder="transformer")
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    with torch.no_grad():
        ours = few_step_sample(
            lambda x, t: model(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0],
            schedule,
            noise,
        )
    assert torch.equal(ours, stock["latents"])


def _broken_data(kind: str, path: Path) -> Path:
    import pyarrow.parquet as pq

    from accel_distill.testing.datasets import write_synthetic_dataset

    if kind == "channels":
        return write_synthetic_dataset(path, latent_shape=(8, 2, 4, 4))
    write_synthetic_dataset(path)
    table = pq.read_table(path)
    table = table.drop(["vae_latent_shape"]) if kind == "missing_column" else table.slice(0, 0)
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize(
    ("kind", "words"),
    [("missing_column", "vae_latent_shape"), ("channels", "channels"), ("empty", "0 rows")],
)
def test_bad_data_is_one_clear_line_naming_the_file(kind, words, tmp_path, tiny_wan, tiny_teacher):
    data = _broken_data(kind, tmp_path / "bad.parquet")
    cfg = base_config("finetune", tiny_wan, tiny_teacher, data, tmp_path / "out")
    proc = run_cli("--config", str(write_config(tmp_path / "run.yaml", cfg)))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(data) in errors[0] and words in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_error_raised_under_the_progress_bar_starts_its_own_line(tmp_path, tiny_wan, tiny_teacher):
    """A bad row found mid-training (after the bar is drawn): the error line is not glued to the bar."""
    from accel_distill.data import write_parquet

    gen = torch.Generator().manual_seed(0)
    rows = [
        {
            "id": f"s{i}",
            "caption": "c",
            "text_embedding": torch.randn(20 if i == 13 else 8, 32, generator=gen),  # 20 > text_max_length 16
            "latent": torch.randn(16, 2, 4, 4, generator=gen),
        }
        for i in range(16)
    ]
    data = tmp_path / "late-bad-row.parquet"
    write_parquet(data, rows, row_group_size=4)  # row 13 is in the 4th row group: read lazily, mid-training
    cfg = base_config("finetune", tiny_wan, tiny_teacher, data, tmp_path / "out")
    cfg["training"].update(max_train_steps=8, shuffle=False, checkpointing_steps=100)
    proc = run_cli("--config", str(write_config(tmp_path / "run.yaml", cfg)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "train:" in proc.stderr and "it/s]" in proc.stderr  # the bar was drawn before the error
    lines = [line for line in proc.stderr.split("\n") if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "row 13" in lines[0] and "text_max_length=16" in lines[0] and "Traceback" not in proc.stderr
