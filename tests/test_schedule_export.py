"""Few-step schedule fitting, the project's sampler, and the stock-diffusers export round trip."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from accel_distill.errors import ConfigError
from accel_distill.export import EXPORT_INFO_FILE, export_student
from accel_distill.sampling import few_step_sample
from accel_distill.schedule import FewStepSchedule, fit_few_step_schedule
from accel_distill.testing.tiny_wan import build_tiny_wan

KEY = "method_config.dmd_denoising_steps"


# ---------------------------------------------------------------- fitting


@pytest.mark.parametrize("steps", [[1000], [1000, 500], [1000, 757, 522], [1000, 900, 100], [1000.0, 750.5, 300.25]])
def test_one_to_three_steps_fit_exactly(steps):
    sched = fit_few_step_schedule(steps)
    assert len(sched.timesteps) == len(steps)
    assert sched.timesteps[0] == 1000.0
    assert max(abs(a - b) for a, b in zip(sched.timesteps, steps)) < 1e-3  # float32 resolution
    assert (sched.shift_terminal is None) == (len(steps) == 1)


def test_seed_form_with_trailing_zero_is_accepted_within_tolerance():
    sched = fit_few_step_schedule([999, 750, 500, 250, 0])
    assert len(sched.timesteps) == 4
    assert max(abs(a - b) for a, b in zip(sched.timesteps, [999, 750, 500, 250])) <= 1.0
    assert sched.sigmas[-1] == 0.0 and len(sched.sigmas) == 5


def test_inexpressible_list_names_key_and_closest():
    with pytest.raises(ConfigError) as err:
        fit_few_step_schedule([1000, 990, 100, 90])
    msg = str(err.value)
    assert msg.startswith(KEY + ":") and "closest expressible is [1000.0," in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="my.key"):
        fit_few_step_schedule([1000, 990, 100, 90], key="my.key")


@pytest.mark.parametrize(
    "steps", [[], [0], [1000, 1000], [500, 750], [1001, 500], [1000, -5], [1000, 0, 0], "1000", [True], [float("nan")]]
)
def test_bad_lists_raise_config_error(steps):
    with pytest.raises(ConfigError, match=KEY):
        fit_few_step_schedule(steps)


@pytest.mark.parametrize("steps", [[1000], [1000, 500], [1000, 757, 522], [999, 750, 500, 250, 0]])
def test_scheduler_from_config_reproduces_timesteps_exactly(steps):
    from diffusers import FlowMatchLCMScheduler

    sched = fit_few_step_schedule(steps)
    lcm = FlowMatchLCMScheduler.from_config(json.loads(json.dumps(sched.scheduler_config())))
    lcm.set_timesteps(len(sched.timesteps))
    assert tuple(lcm.timesteps.tolist()) == sched.timesteps
    assert tuple(lcm.sigmas.tolist()) == sched.sigmas


def test_sampler_rejects_hand_written_inconsistent_schedule():
    bad = FewStepSchedule(timesteps=(1000.0, 600.0), shift=1.0, shift_terminal=0.5)
    with pytest.raises(ValueError, match="fit_few_step_schedule"):
        few_step_sample(lambda x, t: x, bad, torch.zeros(1, 2))


def test_sampler_with_generator_matches_scheduler_step():
    from diffusers import FlowMatchLCMScheduler

    sched = fit_few_step_schedule([1000, 757, 522])
    weight = torch.linspace(-1, 1, 6).view(1, 6)

    def flow(x, t):
        return x * weight + t.view(-1, 1) / 1000

    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    ours = few_step_sample(flow, sched, x, generator=torch.Generator().manual_seed(7))
    lcm = FlowMatchLCMScheduler(**sched.scheduler_config())
    lcm.set_timesteps(3)
    gen, ref = torch.Generator().manual_seed(7), x
    for t in lcm.timesteps:
        ref = lcm.step(flow(ref, t.expand(2)), t, ref, generator=gen).prev_sample
    assert torch.equal(ours, ref)


# ---------------------------------------------------------------- export

STOCK_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from diffusers import FlowMatchLCMScheduler, WanPipeline

    out, work = sys.argv[1], sys.argv[2]
    pipe = WanPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, FlowMatchLCMScheduler), type(pipe.scheduler)
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["timestep"].tolist()), with_kwargs=True
    )
    embeds = torch.load(work + "/embeds.pt")
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(123)
    latents = pipe(
        prompt_embeds=embeds, num_inference_steps=3, guidance_scale=1.0, height=32, width=32, num_frames=5,
        output_type="latent", generator=generator,
    ).frames
    assert not any(m == "accel_distill" or m.startswith("accel_distill.") for m in sys.modules)
    torch.save({"latents": latents, "timesteps": seen}, work + "/stock.pt")
    """
)


def _tree_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_export_round_trip_with_stock_diffusers(tmp_path):
    from diffusers import WanTransformer3DModel

    src = build_tiny_wan(tmp_path / "src")
    student = WanTransformer3DModel.from_pretrained(src, subfolder="transformer")
    schedule = fit_few_step_schedule([1000, 757, 522])
    out = export_student(student, str(src), tmp_path / "out", schedule)

    assert out == tmp_path / "out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp/old siblings left
    for name in ["vae", "text_encoder", "tokenizer"]:
        files = _tree_files(src / name)
        assert files and files == _tree_files(out / name)
        _, mismatch, errors = filecmp.cmpfiles(src / name, out / name, files, shallow=False)
        assert not mismatch and not errors
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchLCMScheduler"]
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    info = json.loads((out / EXPORT_INFO_FILE).read_text())
    assert info["num_inference_steps"] == 3 and info["sampling"]["guidance_scale"] == 1.0
    assert tuple(info["timesteps"]) == schedule.timesteps

    # Stock diffusers only, in a fresh interpreter.
    work = tmp_path / "work"
    work.mkdir()
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(5))
    torch.save(embeds, work / "embeds.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_SCRIPT, str(out), str(work)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    stock = torch.load(work / "stock.pt")

    # The project's sampler with the exported weights, same initial noise, same global seed.
    exported = WanTransformer3DModel.from_pretrained(out, subfolder="transformer").eval()
    for a, b in zip(student.state_dict().values(), exported.state_dict().values()):
        assert torch.equal(a, b)

    def predict_flow(x, t):
        with torch.no_grad():
            return exported(hidden_states=x.to(exported.dtype), timestep=t, encoder_hidden_states=embeds)[0]

    noise = torch.randn((1, 16, (5 - 1) // 4 + 1, 32 // 8, 32 // 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    ours = few_step_sample(predict_flow, schedule, noise)

    assert [ts[0] for ts in stock["timesteps"]] == list(schedule.timesteps)
    assert torch.equal(ours, stock["latents"])  # same ops, same RNG stream: bitwise equal


def test_failed_export_keeps_previous_and_leaves_no_temp(tmp_path):
    from diffusers import WanTransformer3DModel

    src = build_tiny_wan(tmp_path / "src")
    student = WanTransformer3DModel.from_pretrained(src, subfolder="transformer")
    out = export_student(student, str(src), tmp_path / "out", fit_few_step_schedule([1000, 500]))
    before = {f: (out / f).read_bytes() for f in _tree_files(out)}

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    student.save_pretrained = boom
    with pytest.raises(RuntimeError, match="disk full"):
        export_student(student, str(src), out, fit_few_step_schedule([1000, 757, 522]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert {f: (out / f).read_bytes() for f in _tree_files(out)} == before

    del student.save_pretrained  # a successful re-export replaces the old folder
    export_student(student, str(src), out, fit_few_step_schedule([1000, 757, 522]))
    assert json.loads((out / EXPORT_INFO_FILE).read_text())["num_inference_steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_hub_source_downloads_only_needed_files(tmp_path, monkeypatch):
    import huggingface_hub
    from diffusers import WanTransformer3DModel

    src = build_tiny_wan(tmp_path / "src")
    calls = []

    def fake_hf_hub_download(repo_id, filename, **kwargs):
        calls.append(("file", repo_id, filename))
        return str(src / filename)

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(("snapshot", repo_id, sorted(allow_patterns)))
        return str(src)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    student = WanTransformer3DModel.from_pretrained(src, subfolder="transformer")
    export_student(student, "owner/tiny-wan", tmp_path / "out", fit_few_step_schedule([1000]))
    assert calls == [
        ("file", "owner/tiny-wan", "model_index.json"),
        ("snapshot", "owner/tiny-wan", ["model_index.json", "text_encoder/*", "tokenizer/*", "vae/*"]),
    ]
    with pytest.raises(ConfigError, match="not a diffusers pipeline folder"):
        export_student(student, str(tmp_path / "missing"), tmp_path / "out2", fit_few_step_schedule([1000]))
