"""The moving-digits video model: clips and splits, GIF -> ``preprocess videos``, the rebuild recipe
(few steps), the demo's grids and the quality benchmark's mechanics on a few samples.

Quality itself is measured by benchmarks/quality.py, not here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("sklearn")

from accel_distill.digits.data import load_split  # noqa: E402
from accel_distill.digits.video import (  # noqa: E402
    DIRECTIONS,
    crops,
    make_clips,
    motion_direction,
    video_caption,
)

ROOT = Path(__file__).resolve().parents[1]


def test_splits_are_disjoint_and_fixed_by_seed():
    train, val, test = (load_split(s, seed=0) for s in ("train", "validation", "test"))
    assert len(train.labels) + len(val.labels) + len(test.labels) == 1797
    assert not set(train.indices) & set(val.indices) and not set(val.indices) & set(test.indices)
    assert not set(train.indices) & set(test.indices)
    assert np.array_equal(load_split("test", seed=0).indices, test.indices)
    assert set(load_split("held_out", seed=0).indices) == set(val.indices) | set(test.indices)
    with pytest.raises(ValueError, match="unknown digits split 'valid'"):
        load_split("valid")


def test_clips_move_as_captioned_and_stay_in_frame():
    split = load_split("validation")
    clips = make_clips(split, 64, seed=3)
    again = make_clips(split, 64, seed=3)
    assert np.array_equal(clips.frames, again.frames)
    assert not np.array_equal(clips.frames, make_clips(split, 64, seed=4).frames)
    assert clips.frames.shape == (64, 9, 16, 16) and clips.frames.dtype == np.uint8
    assert set(clips.digit_indices) <= set(split.indices)
    assert (motion_direction(clips.frames) == clips.directions).all()
    # the whole digit is in every frame: the same ink in each
    ink = clips.frames.reshape(64, 9, -1).astype(np.int64).sum(-1)
    assert (ink == ink[:, :1]).all()
    # cut around the centroid, every frame holds the same digit
    c = crops(clips.frames)
    assert c.shape == (64, 9, 8, 8) and (c == c[:, :1]).all()
    assert clips.captions[0] == video_caption(clips.labels[0], clips.directions[0])
    assert clips.captions[0].startswith(f"the digit {clips.labels[0]} moves ")
    fixed = make_clips(split, 8, seed=0, labels=np.arange(8), directions=np.arange(8) % 4)
    assert list(fixed.labels) == list(range(8)) and [DIRECTIONS[d] for d in fixed.directions[:2]] == ["left", "right"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on the shared 2-core machine two torch threads made this file ~4x slower
    (72 s vs 15 s for it and test_digits.py together)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fast_build(tmp_path_factory, one_thread):
    from accel_distill.digits.build_video import build

    tmp = tmp_path_factory.mktemp("digits_video")
    out = build(tmp / "model", tmp / "work", fast=True)
    return out, tmp / "work"


@pytest.mark.timeout(600)
def test_rebuild_recipe_goes_through_gif_files_and_preprocess(fast_build):
    """Clips written as GIF + caption files and encoded by `preprocess videos`: latents are the VAE's
    posterior mode of exactly the clips' pixels, captions follow the clips; the export is a WanPipeline."""
    from diffusers import AutoencoderKLWan

    from accel_distill.data.schema import bytes_to_tensor
    from accel_distill.digits.build_video import CLIPS_PER_DIGIT
    from accel_distill.digits.vae import encode_mean

    out, work = fast_build
    info = json.loads((out / "digits_build.json").read_text())
    assert (info["height"], info["width"], info["num_frames"]) == (16, 16, 9)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and (out / "transformer").is_dir()
    assert len(list((work / "clips" / "train").glob("clip-*.gif"))) == 32
    table = pq.read_table(work / "data" / "train" / "part-00000.parquet").to_pylist()
    assert len(table) == 32
    train = load_split("train", seed=0)
    clips = make_clips(train, CLIPS_PER_DIGIT * len(train.labels), seed=1)
    vae = AutoencoderKLWan.from_pretrained(work / "base", subfolder="vae")
    expected = encode_mean(vae, clips[:4].pixels())
    for k, row in enumerate(table[:4]):
        lat = bytes_to_tensor(row["vae_latent_bytes"], row["vae_latent_shape"], row["vae_latent_dtype"])
        assert tuple(lat.shape) == (16, 5, 4, 4)  # time 2x, space 4x
        torch.testing.assert_close(lat, expected[k], atol=1e-5, rtol=1e-4)
        assert row["caption"] == clips.captions[k] and row["id"] == f"clip-{k:05d}.gif"


@pytest.mark.timeout(600)
def test_demo_writes_animated_and_still_grids(fast_build, tmp_path):
    from PIL import Image

    from accel_distill.digits.grid import COLUMNS, sample_columns, write_grids, write_prompt_data

    out, _ = fast_build
    data = write_prompt_data(out, tmp_path / "data", repeats=1)
    rows = [r for f in sorted(data.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert sorted(r["caption"] for r in rows) == sorted(video_caption(d, k) for d in range(10) for k in range(4))
    assert all(not r.get("vae_latent_bytes") for r in rows)  # text only: data-free DMD2
    cols, times, guidance = sample_columns(out, out, rows=2)
    assert len(cols) == len(times) == len(COLUMNS) and cols[0].shape == (2, 9, 16, 16)
    write_grids(cols, guidance, tmp_path / "samples.gif", tmp_path / "samples.png")
    gif = Image.open(tmp_path / "samples.gif")
    assert gif.n_frames == 9 and gif.size[0] > len(COLUMNS) * 64
    assert Image.open(tmp_path / "samples.png").size[0] > 3 * len(COLUMNS) * 64


@pytest.mark.timeout(600)
def test_quality_benchmark_mechanics(fast_build, tmp_path):
    """benchmarks/quality.py on a few samples: every sampler row, the reference rows, the JSON
    fields and the target lines -- mechanics only; the numbers are the benchmark's business."""
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    out, _ = fast_build
    student = tmp_path / "student"  # a 2-step "student": the teacher folder with export info naming its steps
    import shutil

    shutil.copytree(out, student)
    info = json.loads((student / "accel_distill_export.json").read_text())
    info.update(method="dmd2", timesteps=[1000, 500], method_config={"real_score_guidance_scale": 2.0})
    (student / "accel_distill_export.json").write_text(json.dumps(info))
    report = tmp_path / "quality.json"
    args = ["--teacher", str(out), "--student", str(student), "--num-samples", "8", "--batch-size", "8"]
    args += ["--teacher-steps", "8", "4", "1", "--train-clips", "200", "--split", "validation"]
    assert quality.main([*args, "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    rows = [(r["sampler"], r["steps"]) for r in data["results"]]
    assert rows[:3] == [("teacher (CFG 2)", n) for n in (8, 4, 1)]
    assert quality.TEACHER_STEPS == (50, 8, 4, 2, 1)  # the default rows
    assert ("dmd2 student", 2) in rows and ("dmd2 student", 1) in rows
    assert sum(name.startswith("undistilled") for name, _ in rows) == 2
    for r in data["results"]:
        assert {"sampler", "steps", "accuracy", "motion_accuracy", "fd", "sec_per_sample"} <= set(r)
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["motion_accuracy"] <= 1 and np.isfinite(r["fd"])
    real, flat = data["references"]
    assert real["motion_accuracy"] == 1.0 and flat["motion_accuracy"] == 1.0 and real["accuracy"] > 0.5
    assert data["split"] == "validation" and len(data["targets"]) == 5
    assert all(("PASS" in t) != ("FAIL" in t) for t in data["targets"])
