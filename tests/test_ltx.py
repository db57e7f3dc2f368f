"""LTX-Video: packed tokens, a text mask, rope scaled by video size, its own sigma spacing -- a family in one file.

Tiny pipelines built from diffusers configs (``accel_distill.testing.tiny_ltx``) and loaded through
``from_pretrained`` like ``Lightricks/LTX-Video``: preprocess with the family's VAE and T5, DMD2 and a LoRA
finetune through ``train_distill.py``, export, and stock ``LTXPipeline`` (a plain ``num_inference_steps=N``
call) samples the exports at the trained timesteps with latents equal to ours, bitwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import family_config, preprocess_clips, read_metrics, run_cli, write_config
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

from accel_distill.cli import main as train_main
from accel_distill.config import load_config
from accel_distill.data import bytes_to_tensor
from accel_distill.errors import ConfigError
from accel_distill.families.ltx import LTXAdapter, LTXFamily, LTXFlow, fit_ltx_schedule
from accel_distill.testing.datasets import write_synthetic_dataset
from accel_distill.testing.tiny_ltx import TEXT_DIM, VIDEO, build_tiny_ltx, perturb_transformer

STEPS = [1000, 757, 522]  # not LTXPipeline's unshifted spacing: needs the fitted shift
LATENT = (8, 3, 8, 8)  # [C, T, H, W] of a 9 x 32 x 32 clip
TEXT_LENGTH = 16
SIZE = ["--height", "32", "--width", "32", "--num-frames", "9", "--text-max-length", str(TEXT_LENGTH)]


@pytest.fixture(scope="module")
def ltx(tmp_path_factory) -> Path:
    return build_tiny_ltx(tmp_path_factory.mktemp("models") / "tiny-ltx")


@pytest.fixture(scope="module")
def ltx_teacher(tmp_path_factory) -> Path:
    path = build_tiny_ltx(tmp_path_factory.mktemp("models") / "tiny-ltx-teacher")
    perturb_transformer(path, scale=0.05, seed=7)
    return path


@pytest.fixture(scope="module")
def ltx_data(tmp_path_factory, ltx) -> Path:
    """Four 9-frame clips through ``preprocess videos --family ltx`` (the family's VAE and T5)."""
    return preprocess_clips("ltx", ltx, tmp_path_factory.mktemp("clips"), SIZE)


def ltx_config(method: str, student: Path, teacher: Path, data: Path, out: Path) -> dict:
    return family_config("ltx", method, student, teacher, data, out, text_max_length=TEXT_LENGTH, steps=STEPS)


def prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded embeddings (as the reader pads) of 5 real tokens, and the pipeline's mask."""
    embeds = torch.randn(1, TEXT_LENGTH, TEXT_DIM, generator=torch.Generator().manual_seed(5))
    embeds[:, 5:] = 0
    return embeds, torch.arange(TEXT_LENGTH).unsqueeze(0) < 5


def our_sample(cfg_path: Path, model, schedule) -> torch.Tensor:
    """Our sampler (the family's adapter: packing, mask, rope scale; noise.sample) from the pipeline's noise."""
    adapter = LTXFamily(load_config(str(cfg_path))).make_adapter("student")
    noise = randn_tensor((1, *LATENT), generator=torch.Generator().manual_seed(0))  # LTXPipeline.prepare_latents
    cond = adapter.conditioning({"text_embeds": prompt()[0]})
    with torch.no_grad():
        return adapter.noise.sample(lambda x, t: adapter._forward(model, torch.float32, x, t, cond), schedule, noise)


# the stock call: plain num_inference_steps (LTXPipeline computes its sigmas), pad positions hold garbage the mask hides
STOCK_SAMPLER = textwrap.dedent(
    """
    import sys, torch
    from diffusers import LTXPipeline
    folder, embeds, result, steps = sys.argv[1:5]
    pipe = LTXPipeline.from_pretrained(folder)
    if len(sys.argv) > 5:
        pipe.load_lora_weights(sys.argv[5])
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(float(kw["timestep"][0])), with_kwargs=True)
    embeds, mask = torch.load(embeds)
    embeds = torch.where(mask.unsqueeze(-1), embeds, torch.full_like(embeds, 3.0))
    latents = pipe(
        prompt_embeds=embeds, prompt_attention_mask=mask, num_inference_steps=int(steps), guidance_scale=1.0,
        height=32, width=32, num_frames=9, output_type="latent", generator=torch.Generator().manual_seed(0),
    ).frames
    latents = pipe._unpack_latents(latents, 3, 8, 8, 1, 1)
    assert not any(m.startswith("accel_distill") for m in sys.modules)
    torch.save({"latents": latents, "timesteps": seen, "scheduler": dict(pipe.scheduler.config)}, result)
    """
)


def stock_sample(tmp_path: Path, folder: Path, steps: int, lora: Path | None = None) -> dict:
    torch.save(prompt(), tmp_path / "embeds.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [
        str(folder),
        str(tmp_path / "embeds.pt"),
        str(tmp_path / "r.pt"),
        str(steps),
        *([str(lora)] if lora else []),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_SAMPLER, *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "r.pt")


# --- the sigma spacing, the adapter -------------------------------------------------------


def test_fitted_schedule_is_what_ltx_pipeline_sigmas_give():
    """fit_ltx_schedule's config, driven as LTXPipeline drives it (set_timesteps(sigmas=linspace(1, 1/N, N),
    mu=...), use_dynamic_shifting false so mu is ignored), gives exactly the schedule's timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for steps in ([1000], [1000, 500], [1000, 750, 500, 250], STEPS):
        s = fit_ltx_schedule(steps, key="k", tolerance=1.0)
        assert s.scheduler_class == "FlowMatchEulerDiscreteScheduler" and s.kind == "ode"
        stock = FlowMatchEulerDiscreteScheduler(**s.scheduler_config())
        assert not stock.config.use_dynamic_shifting
        n = len(steps)
        stock.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=1.7)
        assert tuple(stock.timesteps.tolist()) == s.timesteps and tuple(stock.sigmas.tolist()) == s.sigmas
        assert max(abs(a - b) for a, b in zip(s.timesteps, steps)) < 1e-3
    with pytest.raises(ConfigError, match=r"k: 4 timesteps .* closest expressible is \[1000.0, 862.6, 637.4, 200.0\]"):
        fit_ltx_schedule([1000, 900, 600, 200], key="k", tolerance=1.0)
    with pytest.raises(ConfigError, match="first must be 1000"):
        fit_ltx_schedule([900, 500], key="k", tolerance=1.0)
    with pytest.raises(ConfigError, match="'ode'"):
        LTXFlow.fit_few_step(STEPS, key="k", tolerance=1.0, kind="sde")


def test_adapter_calls_the_transformer_as_the_pipeline_does(ltx):
    """Packed tokens, the real-token mask, rope_interpolation_scale from the VAE's ratios; pad rows do not matter;
    latents normalised as LTXPipeline._normalize_latents."""
    from diffusers import LTXPipeline

    pipe = LTXPipeline.from_pretrained(ltx)
    model, vae = pipe.transformer.eval(), pipe.vae
    adapter = LTXAdapter(
        LTXFlow(), dict(model.config), dict(vae.config), vae.latents_mean.tolist(), vae.latents_std.tolist()
    )
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, *LATENT, generator=gen), torch.randn(2, TEXT_LENGTH, TEXT_DIM, generator=gen)
    text[0, 5:], text[1, 9:] = 0, 0
    t = torch.tensor([1000.0, 300.0])
    cond = adapter.conditioning({"text_embeds": text})
    assert cond["text_mask"].sum(1).tolist() == [5, 9]
    scale = (pipe.vae_temporal_compression_ratio / 25, pipe.vae_spatial_compression_ratio) + (4,)
    assert adapter.rope_interpolation_scale == scale
    with torch.no_grad():
        ours = adapter._forward(model, torch.float32, x, t, cond)
        stock = model(
            hidden_states=pipe._pack_latents(x, 1, 1),
            encoder_hidden_states=text,
            timestep=t,
            encoder_attention_mask=cond["text_mask"],
            num_frames=3,
            height=8,
            width=8,
            rope_interpolation_scale=scale,
            return_dict=False,
        )[0]
        garbage = adapter._forward(
            model, torch.float32, x, t, {**cond, "text": text + 3.0 * ~cond["text_mask"][..., None]}
        )
    assert torch.equal(ours, pipe._unpack_latents(stock, 3, 8, 8, 1, 1)) and torch.equal(ours, garbage)
    neg = adapter.negative(cond, torch.cat([torch.ones(2, TEXT_DIM), torch.zeros(TEXT_LENGTH - 2, TEXT_DIM)]))
    assert neg["text_mask"].sum(1).tolist() == [2, 2]
    raw = torch.randn(1, *LATENT, generator=gen)
    normal = pipe._normalize_latents(raw, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    assert torch.equal(adapter.normalize_latents(raw), normal)
    torch.testing.assert_close(adapter.denormalize_latents(normal), raw)


def test_validation_decodes_as_the_pipeline_at_decode_timestep_0():
    """A timestep-conditioned VAE (LTX-Video 0.9.1+) needs a decode timestep: LTXPipeline's default 0, no noise."""
    from accel_distill.testing.tiny_ltx import tiny_vae

    vae = tiny_vae(timestep_conditioning=True).eval()
    z = torch.randn(1, 8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(LTXFamily.decode(None, vae, z), vae.decode(z, torch.zeros(1), return_dict=False)[0])


# --- preprocess, training, export, stock sampling ---------------------------------------------------


def test_preprocess_stores_the_vae_mode_and_the_real_t5_tokens(ltx_data, ltx):
    from diffusers import LTXPipeline

    rows = [r for f in sorted(ltx_data.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 4 and all(r["vae_latent_shape"] == list(LATENT) for r in rows)
    row = next(r for r in rows if r["id"] == "clip1.mp4")
    pipe = LTXPipeline.from_pretrained(ltx, transformer=None, vae=None)
    full, mask, _, _ = pipe.encode_prompt(row["caption"], do_classifier_free_guidance=False, max_sequence_length=16)
    text = bytes_to_tensor(row["text_embedding_bytes"], row["text_embedding_shape"], row["text_embedding_dtype"])
    assert row["text_embedding_shape"] == [int(mask.sum()), TEXT_DIM] < [TEXT_LENGTH, TEXT_DIM]
    torch.testing.assert_close(text, full[0, : int(mask.sum())])


def test_dmd2_export_is_sampled_by_stock_ltx_pipeline_bitwise(tmp_path, ltx, ltx_teacher, ltx_data):
    """DMD2 on the preprocessed latents (teacher CFG against the encoded negative prompt, validation through
    noise.sample); stock LTXPipeline loading the export, called with plain num_inference_steps=3, visits exactly
    the trained timesteps and its latents equal our sampler's."""
    out = tmp_path / "out"
    cfg = ltx_config("dmd2", ltx, ltx_teacher, ltx_data, out)
    cfg["pipeline_config"].update(VIDEO)
    validation = tmp_path / "validation.json"
    validation.write_text(json.dumps({"data": [{"caption": "a red cat"}]}))
    cfg["training"].update(log_validation=True, validation_steps=4, validation_dataset_file=str(validation))
    path = write_config(tmp_path / "dmd2.yaml", cfg)
    assert (proc := run_cli("--config", str(path))).returncode == 0, proc.stderr[-3000:]

    rows = read_metrics(out)
    assert ["dmd_loss" in r for r in rows] == [True, False, True, False]
    assert (out / "validation" / "step-4" / "0_3steps_g1.png").is_file()
    info = json.loads((out / "export" / "accel_distill_export.json").read_text())
    assert info["scheduler"]["class"] == "FlowMatchEulerDiscreteScheduler" and info["pipeline_class"] == "LTXPipeline"

    from diffusers import LTXVideoTransformer3DModel

    from accel_distill.methods.dmd2 import DMD2Method

    schedule = DMD2Method.schedule_from(load_config(str(path)))
    stock = stock_sample(tmp_path, out / "export", 3)
    assert stock["timesteps"] == list(schedule.timesteps) and not stock["scheduler"]["use_dynamic_shifting"]
    model = LTXVideoTransformer3DModel.from_pretrained(out / "export", subfolder="transformer")
    assert torch.equal(our_sample(path, model, schedule), stock["latents"])


def test_lora_finetune_with_ema_resumes_and_exports_a_diffusers_lora_the_stock_pipeline_loads(tmp_path, ltx, ltx_data):
    """A LoRA finetune with EMA: 4 steps straight == 2 + resume + 2 (losses, exported adapter); the export's
    pytorch_lora_weights.safetensors (LTXPipeline.save_lora_weights) loads with stock load_lora_weights, holds the
    EMA-averaged adapter, and a 4-step stock call then samples what our sampler does, bitwise."""
    out, resumed = tmp_path / "out", tmp_path / "resumed"
    cfg = ltx_config("finetune", ltx, ltx, ltx_data, out)
    lora = {"rank": 4, "alpha": 8, "init": "gaussian"}
    cfg["roles"]["student"].update(lora=lora, ema={"decay": 0.5}, learning_rate=1e-2)
    cfg["method_config"] = {"cfg_dropout_rate": 0.0}
    path = write_config(tmp_path / "ft.yaml", cfg)
    assert (proc := run_cli("--config", str(path))).returncode == 0, proc.stderr[-3000:]
    ckpt2 = out / "checkpoints" / "checkpoint-2"
    proc = run_cli("--config", str(path), f"training.output_dir={resumed}", f"training.resume_from_checkpoint={ckpt2}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["total_loss"] for r in read_metrics(out)[2:]] == [r["total_loss"] for r in read_metrics(resumed)]
    a, b = (load_file(o / "export" / "pytorch_lora_weights.safetensors") for o in (out, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from diffusers import LTXVideoTransformer3DModel

    from accel_distill.config.schema import LoraSpec
    from accel_distill.roles import lora_config

    # the stock call at a static shift (the source's dynamic mu shift is not what our many-step sampler does)
    source = shutil.copytree(ltx, tmp_path / "static")
    sched = source / "scheduler" / "scheduler_config.json"
    static = {"use_dynamic_shifting": False, "shift_terminal": None}
    sched.write_text(json.dumps({**json.loads(sched.read_text()), **static}))
    stock = stock_sample(tmp_path, source, 4, lora=out / "export")

    model = LTXVideoTransformer3DModel.from_pretrained(ltx, subfolder="transformer").requires_grad_(False)
    model.add_adapter(lora_config(LoraSpec(**lora)))
    ckpt = out / "checkpoints" / "checkpoint-4"
    shadow = torch.load(ckpt / "shared_state.pt", weights_only=False)["callbacks"]["ema"]["student"]["shadow"]
    with torch.no_grad():  # the EMA shadow, in the order of the trainable parameters
        for p, s in zip([p for p in model.parameters() if p.requires_grad], shadow, strict=True):
            p.copy_(s)
    many = LTXFlow(1.0).many_step_schedule()
    s = many.make_scheduler()
    s.set_timesteps(4)
    schedule = dataclasses.replace(many, timesteps=tuple(s.timesteps.tolist()))
    assert stock["timesteps"] == [1000.0, 750.0, 500.0, 250.0] == list(schedule.timesteps)
    assert torch.equal(our_sample(path, model, schedule), stock["latents"])
    raw = LTXVideoTransformer3DModel.from_pretrained(ltx, subfolder="transformer").requires_grad_(False)
    raw.add_adapter(lora_config(LoraSpec(**lora)))
    assert not raw.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False).unexpected_keys
    assert (our_sample(path, raw, schedule) - stock["latents"]).abs().max() > 1e-6  # the export is the EMA average


# --- bad input: one line before any model loads -------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"pipeline_config.sampler_kind": "sde"}, ["pipeline_config.sampler_kind:", "ode"]),
        ({"pipeline_config.boundary_ratio": 0.5}, ["pipeline_config.boundary_ratio:", "one transformer"]),
        ({"method_config.dmd_denoising_steps": [1000, 900, 600, 200]}, ["dmd_denoising_steps:", "LTXPipeline"]),
    ],
    ids=["sde", "boundary", "steps"],
)
def test_bad_ltx_config_is_one_line(change, words, tmp_path, ltx, ltx_teacher, capsys):
    cfg = ltx_config("dmd2", ltx, ltx_teacher, write_synthetic_dataset(tmp_path / "d.parquet"), tmp_path / "out")
    for key, value in change.items():
        section, name = key.split(".")
        cfg[section][name] = value
    assert train_main(["--config", str(write_config(tmp_path / "run.yaml", cfg)), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err


def test_wan_data_on_an_ltx_recipe_names_the_file_and_the_channels(tmp_path, ltx, capsys):
    wan_data = write_synthetic_dataset(tmp_path / "wan.parquet")  # Wan's 16 latent channels
    cfg = ltx_config("finetune", ltx, ltx, wan_data, tmp_path / "out")
    assert train_main(["--config", str(write_config(tmp_path / "run.yaml", cfg))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(wan_data) in err[0] and "16 channels, expected 8" in err[0], err


def test_fsdp_two_processes_simulate_rollouts_shard_every_role_and_export(tmp_path, ltx, ltx_teacher, ltx_data):
    """2 CPU processes, FSDP2 with accelerate_configs/fsdp8_ltx.yaml (per LTXVideoTransformerBlock): each rank holds
    half of the student, the frozen teacher and the critic; DMD2 with data-free (simulate) rollouts at the
    configured video size trains and exports the full student."""
    from launching import FSDP_SHIM, launch

    out = tmp_path / "out"
    cfg = ltx_config("dmd2", ltx, ltx_teacher, ltx_data, out)
    cfg["method_config"]["rollout_mode"] = "simulate"
    cfg["pipeline_config"].update(VIDEO)
    cfg["training"].update(max_train_steps=2, checkpointing_steps=2, train_batch_size=1)
    report = tmp_path / "shards"
    config = str(write_config(tmp_path / "run.yaml", cfg))
    launch("accelerate_configs/fsdp8_ltx.yaml", FSDP_SHIM, "--config", config, env={"SHARD_REPORT": str(report)})
    for rank in (0, 1):
        shards = json.loads(Path(f"{report}.rank{rank}.json").read_text())
        assert set(shards) == {"student", "teacher", "critic"}
        assert all(0.4 < local / total < 0.6 for local, total in shards.values()), (rank, shards)
    assert [r["iteration"] for r in read_metrics(out)] == [1, 2]
    from diffusers import LTXVideoTransformer3DModel

    exported = LTXVideoTransformer3DModel.from_pretrained(out / "export", subfolder="transformer")
    assert sum(p.numel() for p in exported.parameters()) == shards["student"][1]
