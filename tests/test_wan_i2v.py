"""Image-to-video Wan: Wan2.1 I2V (family wan_i2v) and Wan2.2 TI2V-5B (family wan_ti2v), offline.

Per family: tiny pipelines built from diffusers configs and saved; users' mp4s -> ``preprocess videos``
(the first frame's conditioning columns) -> finetune and DMD2 through ``train_distill.py`` -> export ->
stock ``WanImageToVideoPipeline`` in a subprocess without accel_distill, given the clip's first frame
as a PNG, samples the DMD2 export with latents bitwise equal to our sampler's. Then the bad inputs:
every family / model / data mismatch is one error line before training.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import base_config, read_metrics, write_config
from PIL import Image
from test_preprocess import write_mp4

from accel_distill.cli import main as train_main
from accel_distill.config import load_config
from accel_distill.data import read_tensor_columns
from accel_distill.preprocess.cli import main as preprocess_main
from accel_distill.preprocess.media import load_clip
from accel_distill.registry import FAMILIES
from accel_distill.sampling import few_step_sample
from accel_distill.schedule import fit_few_step_schedule
from accel_distill.testing.tiny_wan import build_tiny_wan, perturb_transformer

# family -> (tiny variant, video size, text length, the conditioning columns preprocess writes)
FAMILY = {
    "wan_i2v": ("i2v", 32, 512, {"image_latent": (16, 2, 4, 4), "image_embeds": (65, 4)}),
    "wan_ti2v": ("ti2v", 64, 16, {"first_frame_latent": (48, 1, 4, 4)}),
}
STEPS = [1000, 757, 522]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    for i, caption in enumerate(["a red cat", "the blue dog video", "one green cat", "two red dog"]):
        write_mp4(root / f"clip{i}.mp4", 6, seed=i)
        (root / f"clip{i}.txt").write_text(caption)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (student / critic model, teacher: the same with a perturbed transformer)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for family, (variant, *_) in FAMILY.items():
        student = build_tiny_wan(root / variant, variant=variant)
        teacher = shutil.copytree(student, root / f"{variant}-teacher")
        perturb_transformer(teacher, scale=0.05, seed=7)
        out[family] = (student, teacher)
    return out


@pytest.fixture(scope="module")
def i2v_data(tmp_path_factory, models, videos) -> dict[str, Path]:
    """family -> its preprocessed videos (fp32, as the stock pipeline computes)."""
    out = {}
    for family, (_, size, text_len, _) in FAMILY.items():
        dest = tmp_path_factory.mktemp("data") / family
        args = ["videos", "--family", family, "--model", models[family][0], "--input", videos, "--output", dest]
        args += ["--height", size, "--width", size, "--num-frames", 5, "--text-max-length", text_len]
        assert preprocess_main([str(a) for a in args]) == 0
        out[family] = dest
    return out


def run_config(family: str, method: str, models, data: Path, out: Path) -> dict:
    student, teacher = models[family]
    cfg = base_config(method, student, teacher, data, out)
    cfg["recipe"]["family"] = family
    cfg["pipeline_config"]["text_max_length"] = FAMILY[family][2]
    cfg["training"].update(checkpointing_steps=100)
    if method == "dmd2":
        cfg["method_config"]["rollout_mode"] = "simulate"  # its conditioning image comes from the data
    else:
        cfg["training"]["max_train_steps"] = 2
    return cfg


def first_row(data: Path, name: str) -> dict:
    rows = [r for f in sorted(data.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    return next(r for r in rows if r["id"].startswith(name))


@pytest.mark.parametrize("family", list(FAMILY))
def test_preprocess_writes_the_conditioning_columns(family, i2v_data):
    _, size, _, columns = FAMILY[family]
    rows = [r for f in sorted(i2v_data[family].glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 4
    for row in rows:
        latent = read_tensor_columns(row, "vae_latent")
        for name, shape in columns.items():
            tensor = read_tensor_columns(row, name)
            assert tuple(tensor.shape) == shape and tensor.dtype == torch.float32 and tensor.isfinite().all()
        first = read_tensor_columns(row, next(iter(columns)))
        assert first.shape[0] == latent.shape[0] and first.shape[2:] == latent.shape[2:]
        # the causal VAE codes the first frame alone: the clip's first latent frame; later ones (I2V) differ
        torch.testing.assert_close(first[:, :1], latent[:, :1])
        assert first.shape[1] == 1 or not torch.allclose(first[:, 1:], latent[:, 1:])


STOCK_SAMPLER = textwrap.dedent(
    """
    import sys, torch
    from diffusers import DiffusionPipeline, WanImageToVideoPipeline
    from PIL import Image
    dmd2, finetuned, image, embeds, size, result = sys.argv[1:7]
    size, image, embeds = int(size), Image.open(image), torch.load(embeds)
    pipe = DiffusionPipeline.from_pretrained(dmd2)
    assert type(pipe) is WanImageToVideoPipeline, type(pipe)
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(float(kw["timestep"].flatten()[-1])), with_kwargs=True
    )
    args = dict(image=image, prompt_embeds=embeds, guidance_scale=1.0, height=size, width=size, num_frames=5,
                output_type="latent")
    torch.manual_seed(123)
    latents = pipe(**args, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).frames
    tuned = WanImageToVideoPipeline.from_pretrained(finetuned)(**args, num_inference_steps=2).frames
    assert not any(m.startswith("accel_distill") for m in sys.modules)
    torch.save({"latents": latents, "timesteps": seen, "tuned": tuned}, result)
    """
)


@pytest.mark.parametrize("family", list(FAMILY))
def test_finetune_and_dmd2_exports_sampled_by_the_stock_pipeline(family, tmp_path, models, i2v_data, videos):
    """finetune and DMD2 (simulate: the rollout is conditioned on the data's first frame) train on the
    preprocessed videos (train_distill.py's main, in this process); stock WanImageToVideoPipeline, given that frame, samples the DMD2 export at the
    trained timesteps with latents equal to ours, bitwise."""
    _, size, text_len, columns = FAMILY[family]
    exports = {}
    for method in ("finetune", "dmd2"):
        out = tmp_path / method
        config = write_config(tmp_path / f"{method}.yaml", run_config(family, method, models, i2v_data[family], out))
        assert train_main(["--config", str(config)]) == 0  # train_distill.py's entry point, in this process
        exports[method] = out / "export"
    rows = read_metrics(tmp_path / "dmd2")
    assert ["dmd_loss" in r for r in rows] == [True, False, True, False] and all(r["skipped_steps"] == 0 for r in rows)
    student = models[family][0] / "transformer" / "diffusion_pytorch_model.safetensors"
    trained = exports["dmd2"] / "transformer" / "diffusion_pytorch_model.safetensors"
    assert trained.read_bytes() != student.read_bytes()

    # the user's image: the first frame of their video, as preprocessing resized and cropped it
    frame = load_clip(videos / "clip0.mp4", height=size, width=size, num_frames=5).frames[0].numpy()
    Image.fromarray(frame).save(tmp_path / "image.png")
    row = first_row(i2v_data[family], "clip0")
    text = torch.zeros(1, text_len, 32)
    embedding = read_tensor_columns(row, "text_embedding")
    text[0, : embedding.shape[0]] = embedding  # zero-padded, as the stream and WanPipeline pad
    torch.save(text, tmp_path / "embeds.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [
        exports["dmd2"],
        exports["finetune"],
        tmp_path / "image.png",
        tmp_path / "embeds.pt",
        size,
        tmp_path / "r.pt",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_SAMPLER, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = torch.load(tmp_path / "r.pt")
    schedule = fit_few_step_schedule(STEPS)
    assert stock["timesteps"] == list(schedule.timesteps)  # exactly what the student trained on
    assert stock["tuned"].isfinite().all()

    # ours: the family's adapter on the data row's conditioning, through the project's sampler
    from diffusers import WanTransformer3DModel

    adapter = FAMILIES[family](load_config(str(tmp_path / "dmd2.yaml"))).make_adapter("student")
    batch = {"text_embeds": text, **{name: read_tensor_columns(row, name)[None] for name in columns}}
    cond = adapter.conditioning(batch)
    model = WanTransformer3DModel.from_pretrained(exports["dmd2"], subfolder="transformer")
    noise = torch.randn(stock["latents"].shape, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    with torch.no_grad():
        ours = few_step_sample(lambda x, t: adapter._forward(model, torch.float32, x, t, cond), schedule, noise)
    if family == "wan_ti2v":  # the pipeline's last step: the first latent frame is the image's
        ours = adapter.with_first_frame(ours, cond)
    assert torch.equal(ours, stock["latents"])


def test_wan_on_ti2v_passes_per_token_timesteps_as_wan_pipeline(tmp_path, models):
    """Text-to-video on Wan2.2 TI2V-5B (family wan): WanPipeline passes one timestep per token under
    expand_timesteps (a [B] timestep differs in the last bits); our sampler matches it bitwise."""
    from diffusers import WanPipeline, WanTransformer3DModel

    model_dir = models["wan_ti2v"][0]
    cfg = base_config("finetune", model_dir, model_dir, tmp_path, tmp_path / "out")
    adapter = FAMILIES["wan"](load_config(str(write_config(tmp_path / "run.yaml", cfg)))).make_adapter("student")
    assert adapter.expand_timesteps and adapter.latent_channels == 48
    schedule = fit_few_step_schedule(STEPS)
    pipe = WanPipeline.from_pretrained(model_dir)
    pipe.scheduler = schedule.make_scheduler()
    text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(5))
    kwargs = dict(prompt_embeds=text, guidance_scale=1.0, height=64, width=64, num_frames=5, output_type="latent")
    torch.manual_seed(123)
    stock = pipe(**kwargs, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).frames
    model = WanTransformer3DModel.from_pretrained(model_dir, subfolder="transformer")
    noise = torch.randn(stock.shape, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    with torch.no_grad():
        ours = few_step_sample(
            lambda x, t: adapter._forward(model, torch.float32, x, t, {"text": text}), schedule, noise
        )
    assert torch.equal(ours, stock)


def _bad_case(case: str, models, i2v_data, tiny_wan, latent_data, text_data) -> tuple[dict, list[str]]:
    """(run config, words its one error line must hold) of each bad input."""
    i2v, ti2v = models["wan_i2v"][0], models["wan_ti2v"][0]
    family, method, data, words = "wan_i2v", "finetune", i2v_data["wan_i2v"], []
    model = i2v
    if case == "t2v-data":  # an I2V recipe on text-to-video data: no conditioning columns
        data, words = latent_data, ["image_latent", str(latent_data)]
    elif case == "text-only-data":  # DMD2's data-free rollout still needs the conditioning image
        method, data, words = "dmd2", text_data, ["image_latent", str(text_data)]
    elif case == "ti2v-data-on-i2v":  # data preprocessed for TI2V (expand_timesteps) on an I2V model
        data, words = i2v_data["wan_ti2v"], ["image_latent", str(i2v_data["wan_ti2v"])]
    elif case == "i2v-data-on-ti2v":
        family, model, data, words = "wan_ti2v", ti2v, i2v_data["wan_i2v"], ["first_frame_latent"]
    elif case == "wan_i2v-on-t2v-model":
        model, words = tiny_wan, ["roles.student.path:", "text-to-video", "recipe.family wan"]
    elif case == "wan-on-i2v-model":
        family, words = "wan", ["roles.student.path:", "36 input channels", "recipe.family wan_i2v"]
    elif case == "wan_i2v-on-ti2v-model":
        model, words = ti2v, ["roles.student.path:", "expand_timesteps", "wan_ti2v"]
    elif case == "wan_ti2v-on-i2v-model":
        family, words = "wan_ti2v", ["roles.student.path:", "image-to-video", "wan_i2v"]
    elif case == "wan_ti2v-on-t2v-model":
        family, model, data, words = "wan_ti2v", tiny_wan, latent_data, ["roles.student.path:", "expand_timesteps"]
    elif case == "text-length":  # Wan2.1 I2V's image attention takes the text as the last 512 tokens
        words = ["pipeline_config.text_max_length:", "512"]
    elif case == "validation":
        words = ["training.log_validation:", "wan_i2v"]
    elif case == "rollout-size":  # images without videos: the rollout's size (64) must be the data's (32)
        method, words = "dmd2", ["'image_latent'", "pipeline_config.num_frames / height / width"]
    cfg = base_config(method, model, model, data, Path("/nonexistent-out"))
    cfg["recipe"]["family"] = family
    cfg["pipeline_config"]["text_max_length"] = 16 if case == "text-length" or family != "wan_i2v" else 512
    if method == "dmd2":
        cfg["method_config"]["rollout_mode"] = "simulate"
        size = 64 if case == "rollout-size" else 32
        cfg["pipeline_config"].update(num_frames=5, height=size, width=size)
    return cfg, words


BAD_CASES = [
    "t2v-data",
    "text-only-data",
    "ti2v-data-on-i2v",
    "i2v-data-on-ti2v",
    "wan_i2v-on-t2v-model",
    "wan-on-i2v-model",
    "wan_i2v-on-ti2v-model",
    "wan_ti2v-on-i2v-model",
    "wan_ti2v-on-t2v-model",
    "text-length",
    "validation",
    "rollout-size",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_before_training(
    case, tmp_path, capsys, models, i2v_data, tiny_wan, latent_data, text_data
):
    cfg, words = _bad_case(case, models, i2v_data, tiny_wan, latent_data, text_data)
    out = tmp_path / "out"
    cfg["training"]["output_dir"] = str(out)
    if case == "validation":
        (tmp_path / "validation.json").write_text(json.dumps(["a red cat"]))
        cfg["training"].update(log_validation=True, validation_dataset_file=str(tmp_path / "validation.json"))
    if case == "rollout-size":  # the preprocessed rows without their video latents: prompts + first frames
        for f in sorted(i2v_data["wan_i2v"].glob("part-*.parquet")):
            table = pq.read_table(f)
            pq.write_table(table.drop([c for c in table.column_names if c.startswith("vae_latent")]), tmp_path / f.name)
        cfg["training"]["data_path"] = str(tmp_path)
    assert train_main(["--config", str(write_config(tmp_path / "run.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    if case == "rollout-size":  # found at the first step (after start-up's progress bars): the one error line
        lines = [line for line in lines if "error:" in line]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert all(w in lines[0] for w in words), lines[0]
    assert not (out / "checkpoints").exists()


def test_preprocess_for_an_image_family_on_a_text_to_video_model_is_one_line(capsys, tmp_path, videos, tiny_wan):
    args = ["videos", "--family", "wan_i2v", "--model", tiny_wan, "--input", videos, "--output", tmp_path / "o"]
    args += ["--height", 32, "--width", 32, "--num-frames", 5]
    assert preprocess_main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --model") and "--family wan" in err[0], err
