"""CogVideoX: DDPM v-prediction, [B, F, C, H, W] latents, T5, rotary positions -- a family in one file.

Tiny pipelines built from diffusers configs (``accel_distill.testing.tiny_cogvideox``) and loaded
through ``from_pretrained`` like ``THUDM/CogVideoX-2b``: preprocess with the family's VAE and T5,
finetune (LoRA + EMA) and DMD2 through ``train_distill.py``, export, and stock ``CogVideoXPipeline``
samples the exports at the trained timesteps with latents equal to ours.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import family_config, preprocess_clips, read_metrics, run_cli, write_config
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

from accel_distill.cli import main as train_main
from accel_distill.config import load_config
from accel_distill.data import bytes_to_tensor
from accel_distill.families.cogvideox import CogVideoXFamily
from accel_distill.noise import DDPMVPrediction
from accel_distill.testing.datasets import write_synthetic_dataset
from accel_distill.testing.tiny_cogvideox import (
    TEXT_DIM,
    TEXT_LENGTH,
    VIDEO,
    build_tiny_cogvideox,
    perturb_transformer,
    scheduler_config,
)

STEPS = [999, 749, 499, 249]  # stock CogVideoXPipeline's 4 steps (trailing spacing)
LATENT = (4, 3, 4, 4)  # [C, T, H, W] of a 9 x 32 x 32 clip
SIZE = ["--height", "32", "--width", "32", "--num-frames", "9", "--text-max-length", str(TEXT_LENGTH)]


@pytest.fixture(scope="module")
def cog(tmp_path_factory) -> Path:
    return build_tiny_cogvideox(tmp_path_factory.mktemp("models") / "tiny-cogvideox")


@pytest.fixture(scope="module")
def cog_teacher(tmp_path_factory) -> Path:
    path = build_tiny_cogvideox(tmp_path_factory.mktemp("models") / "tiny-cogvideox-teacher")
    perturb_transformer(path, scale=0.05, seed=7)
    return path


@pytest.fixture(scope="module")
def cog_root(tmp_path_factory, cog) -> Path:
    """Four 9-frame clips (``media/``) through ``preprocess videos --family cogvideox`` (``out/``)."""
    root = tmp_path_factory.mktemp("clips")
    preprocess_clips("cogvideox", cog, root, SIZE)
    return root


@pytest.fixture(scope="module")
def cog_media(cog_root) -> Path:
    return cog_root / "media"


@pytest.fixture(scope="module")
def cog_data(cog_root) -> Path:
    return cog_root / "out"


def cog_config(method: str, student: Path, teacher: Path, data: Path, out: Path) -> dict:
    return family_config("cogvideox", method, student, teacher, data, out, text_max_length=TEXT_LENGTH, steps=STEPS)


def stock_noise() -> torch.Tensor:
    """The noise stock CogVideoXPipeline draws ([B, F, C, H, W], generator seed 0), in our [B, C, F, H, W]."""
    return randn_tensor((1, 3, 4, 4, 4), generator=torch.Generator().manual_seed(0)).transpose(1, 2)


def our_sample(cfg_path: Path, model, schedule, embeds: torch.Tensor) -> torch.Tensor:
    """Our sampler (the family's adapter: layout, rotary embeddings; noise.sample) -> [B, F, C, H, W]."""
    adapter = CogVideoXFamily(load_config(str(cfg_path))).make_adapter("student")
    with torch.no_grad():
        out = adapter.noise.sample(
            lambda x, t: adapter._forward(model, torch.float32, x, t, {"text": embeds}), schedule, stock_noise()
        )
    return out.transpose(1, 2)


# --- the noise schedule -----------------------------------------------------------------


def test_ddpm_v_schedule_is_the_stock_schedulers():
    """Noising and v targets equal CogVideoXDDIMScheduler's; conversions invert; the fitted few-step
    configs give the trained timesteps; the DDIM sampler equals the stock step loop bitwise."""
    from diffusers import CogVideoXDDIMScheduler

    from accel_distill.errors import ConfigError
    from accel_distill.sampling import ddim_sample

    noise = DDPMVPrediction(scheduler_config())
    stock = CogVideoXDDIMScheduler(**scheduler_config())
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, *LATENT, generator=gen), torch.randn(3, *LATENT, generator=gen)
    t = torch.tensor([0.0, 500.0, 999.0])
    x_t = noise.add_noise(x0, eps, t)
    v = noise.target(x0, eps, t)
    torch.testing.assert_close(x_t, stock.add_noise(x0, eps, t.long()))
    torch.testing.assert_close(v, stock.get_velocity(x0, eps, t.long()))
    assert torch.equal(x_t[2], eps[2])  # zero terminal SNR: t = 999 is pure noise
    torch.testing.assert_close(noise.to_x0(v, x_t, t), x0)
    torch.testing.assert_close(noise.to_noise(v, x_t, t), eps)
    torch.testing.assert_close(noise.from_x0(x0, x_t, t), v, rtol=1e-4, atol=1e-4)
    assert noise.timesteps_from_uniform(torch.tensor([0.0, 0.5, 0.99999])).tolist() == [0.0, 500.0, 999.0]

    fits = {
        (999, 749, 499, 249): ((999.0, 749.0, 499.0, 249.0), "trailing", 0),
        (1000, 750, 500, 250): ((999.0, 749.0, 499.0, 249.0), "trailing", 0),
        (999, 499): ((999.0, 499.0), "trailing", 0),
        # trailing 3 steps [999, 666, 332] would step 666 -> 333: leading + offset keeps train == sample
        (999, 666, 333): ((998.0, 665.0, 332.0), "leading", 332),
    }
    for steps, (timesteps, spacing, offset) in fits.items():
        s = noise.fit_few_step(list(steps), key="k", tolerance=1.0, kind="ode")
        assert (s.timesteps, s.config["timestep_spacing"], s.config["steps_offset"]) == (timesteps, spacing, offset)
        assert s.scheduler_class == "CogVideoXDDIMScheduler" and s.sigmas[0] > 0.9999 and s.sigmas[-1] == 0.0
    with pytest.raises(ConfigError, match=r"k: 3 timesteps .* closest expressible is \[998.0, 665.0, 332.0\]"):
        noise.fit_few_step([999, 900, 100], key="k", tolerance=1.0, kind="ode")

    schedule = noise.fit_few_step(STEPS, key="k", tolerance=1.0, kind="ode")
    weight = torch.randn(4, 4, generator=gen)

    def predict(x, t):
        return 0.1 * torch.einsum("bcfhw,cd->bdfhw", x, weight) + t.float().view(-1, 1, 1, 1, 1) / 1000

    latents = torch.randn(2, *LATENT, generator=gen)
    sched = schedule.make_scheduler()
    sched.set_timesteps(len(STEPS))
    x, y = latents.clone(), latents.clone()
    for i, step_t in enumerate(sched.timesteps):
        if i + 1 < len(STEPS):  # training rollouts: noise.step, in float32, to the next trained timestep
            ts = torch.tensor(schedule.timesteps)
            y = noise.step(y, predict(y, ts[i].expand(2)), ts[i].expand(2), ts[i + 1].expand(2), None, "ode")
        x = sched.step(predict(x, step_t.expand(2)).float(), step_t, x, return_dict=False)[0]
        if i + 1 < len(STEPS):
            torch.testing.assert_close(y, x)
    assert torch.equal(ddim_sample(predict, schedule, latents), x)


@pytest.mark.parametrize("rotary", [True, False], ids=["rotary-5b", "sincos-2b"])
def test_adapter_calls_the_transformer_as_the_pipeline_does(rotary, tmp_path):
    """[B, C, T, H, W] in and out; the model sees [B, T, C, H, W] and CogVideoXPipeline's image_rotary_emb."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    from accel_distill.families.cogvideox import CogVideoXAdapter
    from accel_distill.testing.tiny_cogvideox import tiny_transformer_config, tiny_vae

    torch.manual_seed(0)
    config = tiny_transformer_config(rotary=rotary)
    model = CogVideoXTransformer3DModel(**config).eval()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=model, scheduler=None)
    adapter = CogVideoXAdapter(DDPMVPrediction(scheduler_config()), 4, 0.7, dict(model.config))
    x = torch.randn(2, 4, 5, 6, 8)  # 17 frames of 48 x 64: not the sample size
    text, t = torch.randn(2, TEXT_LENGTH, TEXT_DIM), torch.tensor([999, 10])
    rotary_emb = pipe._prepare_rotary_positional_embeddings(48, 64, 5, torch.device("cpu")) if rotary else None
    with torch.no_grad():
        ours = adapter._forward(model, torch.float32, x, t, {"text": text})
        stock = model(
            hidden_states=x.transpose(1, 2).contiguous(),
            encoder_hidden_states=text,
            timestep=t,
            image_rotary_emb=rotary_emb,
            return_dict=False,
        )[0]
    assert ours.shape == x.shape and torch.equal(ours, stock.transpose(1, 2))
    raw = torch.randn(1, *LATENT)
    torch.testing.assert_close(adapter.denormalize_latents(adapter.normalize_latents(raw)), raw)


# --- preprocess, training, export, stock sampling ---------------------------------------------------


def test_preprocess_stores_the_vae_mode_and_every_t5_row(cog_data, cog_media, cog):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline

    rows = [r for f in sorted(cog_data.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 4 and all(r["vae_latent_shape"] == list(LATENT) for r in rows)
    assert all(r["text_embedding_shape"] == [TEXT_LENGTH, TEXT_DIM] for r in rows)  # padding rows kept
    row = next(r for r in rows if r["id"] == "clip1.mp4")
    pipe = CogVideoXPipeline.from_pretrained(cog, transformer=None, vae=None)
    full, _ = pipe.encode_prompt(row["caption"], do_classifier_free_guidance=False, max_sequence_length=TEXT_LENGTH)
    text = bytes_to_tensor(row["text_embedding_bytes"], row["text_embedding_shape"], row["text_embedding_dtype"])
    torch.testing.assert_close(text, full[0])
    assert full[0, -1].abs().sum() > 0  # T5 without a mask: the pad positions are not zero

    from accel_distill.preprocess.media import load_clip, to_model_input

    clip = load_clip(cog_media / "clip1.mp4", height=32, width=32, num_frames=9)
    vae = AutoencoderKLCogVideoX.from_pretrained(cog, subfolder="vae")
    with torch.no_grad():
        expected = vae.encode(to_model_input(clip.frames)).latent_dist.mode()[0]
    latent = bytes_to_tensor(row["vae_latent_bytes"], row["vae_latent_shape"], row["vae_latent_dtype"])
    torch.testing.assert_close(latent, expected)


STOCK_SAMPLER = textwrap.dedent(
    """
    import sys, torch
    from diffusers import CogVideoXPipeline
    folder, embeds, result = sys.argv[1:4]
    pipe = CogVideoXPipeline.from_pretrained(folder)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(int(kw["timestep"][0])), with_kwargs=True)
    latents = pipe(
        prompt_embeds=torch.load(embeds), num_inference_steps=4, guidance_scale=1.0, height=32, width=32,
        num_frames=9, output_type="latent", generator=torch.Generator().manual_seed(0),
    ).frames
    assert not any(m.startswith("accel_distill") for m in sys.modules)
    torch.save({"latents": latents, "timesteps": seen, "scheduler": type(pipe.scheduler).__name__}, result)
    """
)


def test_dmd2_export_is_sampled_by_stock_cogvideox_pipeline_bitwise(tmp_path, cog, cog_teacher, cog_data):
    """DMD2 on the preprocessed latents (v-prediction teacher with CFG against the encoded negative prompt,
    critic trained in v space, validation through noise.sample); stock CogVideoXPipeline loading the export
    visits exactly the trained timesteps and its latents equal our sampler's."""
    out = tmp_path / "out"
    cfg = cog_config("dmd2", cog, cog_teacher, cog_data, out)
    cfg["pipeline_config"].update(VIDEO)  # validation samples at the training video size
    validation = tmp_path / "validation.json"
    validation.write_text(json.dumps({"data": [{"caption": "a red cat"}]}))
    cfg["training"].update(
        checkpointing_steps=4, log_validation=True, validation_steps=4, validation_dataset_file=str(validation)
    )
    path = write_config(tmp_path / "dmd2.yaml", cfg)
    assert (proc := run_cli("--config", str(path))).returncode == 0, proc.stderr[-3000:]

    rows = read_metrics(out)
    assert ["dmd_loss" in r for r in rows] == [True, False, True, False]
    assert all(r["skipped_steps"] == 0 and "critic_loss" in r for r in rows)
    assert (out / "validation" / "step-4" / "0_4steps_g1.png").is_file()
    student = load_file(out / "checkpoints" / "checkpoint-4" / "model.safetensors")
    exported = load_file(out / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert student.keys() == exported.keys() and all(torch.equal(student[k], exported[k]) for k in student)
    info = json.loads((out / "export" / "accel_distill_export.json").read_text())
    assert info["timesteps"] == STEPS and info["scheduler"]["class"] == "CogVideoXDDIMScheduler"
    assert info["pipeline_class"] == "CogVideoXPipeline" and info["vae_class"] == "AutoencoderKLCogVideoX"
    for part in ("vae", "text_encoder", "tokenizer"):
        for f in (cog / part).iterdir():
            assert (out / "export" / part / f.name).read_bytes() == f.read_bytes()

    embeds = torch.randn(1, TEXT_LENGTH, TEXT_DIM, generator=torch.Generator().manual_seed(5))
    torch.save(embeds, tmp_path / "embeds.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [str(out / "export"), str(tmp_path / "embeds.pt"), str(tmp_path / "r.pt")]
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_SAMPLER, *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = torch.load(tmp_path / "r.pt")
    assert stock["scheduler"] == "CogVideoXDDIMScheduler" and stock["timesteps"] == STEPS

    from diffusers import CogVideoXTransformer3DModel

    from accel_distill.methods.dmd2 import DMD2Method

    model = CogVideoXTransformer3DModel.from_pretrained(out / "export", subfolder="transformer")
    schedule = DMD2Method.schedule_from(load_config(str(path)))
    assert torch.equal(our_sample(path, model, schedule, embeds), stock["latents"])


def test_lora_finetune_with_ema_resumes_and_exports_a_diffusers_lora_the_stock_pipeline_loads(tmp_path, cog, cog_data):
    """A LoRA finetune with EMA: 4 steps straight == 2 + resume + 2 (losses, exported adapter); the export's
    pytorch_lora_weights.safetensors (CogVideoXPipeline.save_lora_weights) loads with stock load_lora_weights,
    holds the EMA-averaged adapter (not the raw one), and the stock pipeline then samples (its own scheduler,
    4 steps) what our sampler does, bitwise."""
    out, resumed = tmp_path / "out", tmp_path / "resumed"
    cfg = cog_config("finetune", cog, cog, cog_data, out)
    lora = {"rank": 4, "alpha": 8, "init": "gaussian"}
    cfg["roles"]["student"].update(lora=lora, ema={"decay": 0.5}, learning_rate=1e-2)
    cfg["method_config"] = {"cfg_dropout_rate": 0.0}
    path = write_config(tmp_path / "ft.yaml", cfg)
    assert (proc := run_cli("--config", str(path))).returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "export" / "accel_distill_export.json").read_text())
    assert info["adapter"] == "lora" and info["ema"] is True and info["method"] == "finetune"
    ckpt2 = out / "checkpoints" / "checkpoint-2"
    proc = run_cli("--config", str(path), f"training.output_dir={resumed}", f"training.resume_from_checkpoint={ckpt2}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["total_loss"] for r in read_metrics(out)[2:]] == [r["total_loss"] for r in read_metrics(resumed)]
    a, b = (load_file(o / "export" / "pytorch_lora_weights.safetensors") for o in (out, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    from accel_distill.config.schema import LoraSpec
    from accel_distill.roles import lora_config

    embeds = torch.randn(1, TEXT_LENGTH, TEXT_DIM, generator=torch.Generator().manual_seed(3))

    def stock_sample(pipe) -> torch.Tensor:
        return pipe(
            prompt_embeds=embeds,
            num_inference_steps=4,
            guidance_scale=1.0,
            **VIDEO,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).frames

    def student(adapter: list[torch.Tensor] | dict[str, torch.Tensor]):
        model = CogVideoXTransformer3DModel.from_pretrained(cog, subfolder="transformer").requires_grad_(False)
        model.add_adapter(lora_config(LoraSpec(**lora)))
        if isinstance(adapter, dict):  # the checkpoint's raw adapter
            assert not model.load_state_dict(adapter, strict=False).unexpected_keys
        else:  # the EMA shadow, in the order of the trainable parameters
            with torch.no_grad():
                for p, s in zip([p for p in model.parameters() if p.requires_grad], adapter, strict=True):
                    p.copy_(s)
        return model

    # the finetuned student samples with the source's scheduler, as validation does
    many = DDPMVPrediction(scheduler_config()).many_step_schedule()
    sched = many.make_scheduler()
    sched.set_timesteps(4)
    schedule = dataclasses.replace(many, timesteps=tuple(float(t) for t in sched.timesteps.tolist()))
    ckpt = out / "checkpoints" / "checkpoint-4"
    shadow = torch.load(ckpt / "shared_state.pt", weights_only=False)["callbacks"]["ema"]["student"]["shadow"]
    ours_ema = our_sample(path, student(shadow), schedule, embeds)
    ours_raw = our_sample(path, student(load_file(ckpt / "model.safetensors")), schedule, embeds)

    pipe = CogVideoXPipeline.from_pretrained(cog)
    pipe.set_progress_bar_config(disable=True)
    base = stock_sample(pipe)
    pipe.load_lora_weights(out / "export")  # pytorch_lora_weights.safetensors, the diffusers way
    with_lora = stock_sample(pipe)
    assert torch.equal(with_lora, ours_ema)
    assert (with_lora - base).abs().max() > 1e-3  # the adapter changed the model
    assert (ours_raw - ours_ema).abs().max() > 1e-4  # the export is the EMA average, not the raw adapter


def test_fsdp_two_processes_shard_every_role_and_export(tmp_path, cog, cog_teacher, cog_data):
    """2 CPU processes, FSDP2 with accelerate_configs/fsdp8_cogvideox.yaml (per CogVideoXBlock): each rank
    holds half of the student, the frozen teacher and the critic; DMD2 trains and exports the full student."""
    from launching import FSDP_SHIM, launch

    out = tmp_path / "out"
    cfg = cog_config("dmd2", cog, cog_teacher, cog_data, out)
    cfg["method_config"]["rollout_mode"] = "simulate"
    cfg["training"].update(max_train_steps=2, checkpointing_steps=2, train_batch_size=1)
    report = tmp_path / "shards"
    config = str(write_config(tmp_path / "run.yaml", cfg))
    launch("accelerate_configs/fsdp8_cogvideox.yaml", FSDP_SHIM, "--config", config, env={"SHARD_REPORT": str(report)})
    for rank in (0, 1):
        shards = json.loads(Path(f"{report}.rank{rank}.json").read_text())
        assert set(shards) == {"student", "teacher", "critic"}
        assert all(0.4 < local / total < 0.6 for local, total in shards.values()), (rank, shards)
    assert [r["iteration"] for r in read_metrics(out)] == [1, 2]
    from diffusers import CogVideoXTransformer3DModel

    exported = CogVideoXTransformer3DModel.from_pretrained(out / "export", subfolder="transformer")
    assert sum(p.numel() for p in exported.parameters()) == shards["student"][1]


# --- bad input: one line before any model loads -------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"pipeline_config.sampler_kind": "sde"}, ["pipeline_config.sampler_kind:", "ode"]),
        ({"pipeline_config.text_max_length": 512}, ["pipeline_config.text_max_length:", f"must be {TEXT_LENGTH}"]),
        ({"pipeline_config.flow_shift": 3.0}, ["pipeline_config.flow_shift:", "DDPM"]),
        ({"method_config.dmd_denoising_steps": [999, 900, 100]}, ["dmd_denoising_steps:", "CogVideoXDDIMScheduler"]),
    ],
    ids=["sde", "text-length", "flow-shift", "steps"],
)
def test_bad_cogvideox_config_is_one_line(change, words, tmp_path, cog, cog_teacher, capsys):
    cfg = cog_config("dmd2", cog, cog_teacher, write_synthetic_dataset(tmp_path / "d.parquet"), tmp_path / "out")
    for key, value in change.items():
        section, name = key.split(".")
        cfg[section][name] = value
    assert train_main(["--config", str(write_config(tmp_path / "run.yaml", cfg)), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err


def test_roles_with_different_noise_schedules_are_refused(tmp_path, cog, cog_teacher, capsys):
    """A teacher whose betas differ (CogVideoX-5b's snr_shift_scale 1.0 against 2b's 3.0) is one line."""
    import shutil

    other = shutil.copytree(cog_teacher, tmp_path / "other-schedule")
    config = other / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "snr_shift_scale": 1.0}))
    cfg = cog_config("dmd2", cog, other, write_synthetic_dataset(tmp_path / "d.parquet"), tmp_path / "out")
    assert train_main(["--config", str(write_config(tmp_path / "run.yaml", cfg)), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "roles.teacher.path:" in err[0] and "scheduler betas differ" in err[0], err


def test_wan_data_on_a_cogvideox_recipe_names_the_file_and_the_channels(tmp_path, cog, capsys):
    wan_data = write_synthetic_dataset(tmp_path / "wan.parquet")  # Wan's 16 latent channels, text width 32
    cfg = cog_config("finetune", cog, cog, wan_data, tmp_path / "out")
    assert train_main(["--config", str(write_config(tmp_path / "run.yaml", cfg))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(wan_data) in err[0] and "16 channels, expected 4" in err[0], err
    assert not (tmp_path / "out" / "checkpoints").exists()
