"""accel_distill.preprocess: media/prompts -> parquet with the family's own VAE and text encoder (offline).

Small mp4s (PyAV) and PNGs (Pillow) are generated here, including a corrupt file,
a video without a caption and a too-short one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, base_config, read_metrics, run_cli, write_config
from PIL import Image

from accel_distill.data import LatentStream, bytes_to_tensor
from accel_distill.preprocess.cli import main
from accel_distill.preprocess.manifest import discover
from accel_distill.preprocess.media import MediaError, load_clip, read_video, resize_center_crop, to_model_input
from accel_distill.prompts import load_embedding_file
from accel_distill.validation import load_embedding, read_prompts

GOOD = ["clip0.mp4", "clip1.mp4", "clip2.mp4", "clip3.mp4", "img0.png", "img1.png"]
BAD = {"broken.mp4": "unreadable", "nocap.mp4": "missing caption", "short.mp4": "too short"}
SIZE = ["--height", "32", "--width", "32", "--num-frames", "5", "--text-max-length", "16"]


def write_mp4(path: Path, frames: int, *, fps: int = 8, width: int = 48, height: int = 40, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            # a flat grey level per frame (identifies the frame after lossy coding) plus a little noise
            rgb = np.clip(i * 20 + rng.integers(-4, 5, (height, width, 3)), 0, 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    words = ["a red cat", "the blue dog video", "one green cat", "two red dog"]
    for i, caption in enumerate(words):
        write_mp4(root / f"clip{i}.mp4", 8, seed=i)
        (root / f"clip{i}.txt").write_text(caption)
    write_mp4(root / "short.mp4", 3)  # 5 frames needed
    (root / "short.txt").write_text("a short video")
    write_mp4(root / "nocap.mp4", 8)  # no caption file
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + np.random.default_rng(3).bytes(600))
    (root / "broken.txt").write_text("a broken video")
    rng = np.random.default_rng(7)
    for i, (w, h) in enumerate([(70, 50), (20, 24)]):  # a downscale and an upscale
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a photo {i}")
    return root


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows_of(out: Path) -> list[dict]:
    rows = []
    for f in sorted(out.glob("part-*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def tensor(row: dict, name: str) -> torch.Tensor:
    return bytes_to_tensor(row[f"{name}_bytes"], row[f"{name}_shape"], row[f"{name}_dtype"])


# --- media reading --------------------------------------------------------------------


def test_frames_from_the_start_at_the_target_fps(tmp_path):
    path = tmp_path / "v.mp4"
    write_mp4(path, 8, fps=8)  # frame i has grey level ~20 i
    level = lambda frames: [round(float(f.mean()) / 20) for f in frames]  # noqa: E731
    frames, fps = read_video(path, 5)
    assert (fps, level(frames)) == (8.0, [0, 1, 2, 3, 4])
    frames, fps = read_video(path, 4, fps=4)  # every other frame
    assert (fps, level(frames)) == (4.0, [0, 2, 4, 6])
    frames, _ = read_video(path, 5, fps=16)  # each frame twice
    assert level(frames) == [0, 0, 1, 1, 2]
    assert read_video(path, 8)[0].shape == (8, 40, 48, 3)
    for n, fps in ((9, None), (5, 4)):
        with pytest.raises(MediaError) as e:
            read_video(path, n, fps)
        assert e.value.reason == "too short"


def test_resize_covers_then_crops_the_centre():
    img = np.zeros((1, 40, 80, 3), np.uint8)
    img[:, :, 15:65] = 255  # a white centre band, a bit wider than the crop will be
    out = resize_center_crop(img, 32, 32)  # 40x80 -> 32x64 -> centre 32x32: all of it inside the band
    assert out.shape == (1, 32, 32, 3) and out.dtype == torch.uint8 and int(out.min()) == 255
    tall = resize_center_crop(np.zeros((2, 100, 30, 3), np.uint8), 32, 64)
    assert tall.shape == (2, 32, 64, 3)
    x = to_model_input(out)
    assert x.shape == (1, 3, 1, 32, 32) and float(x.max()) == 1.0


def test_manifests_csv_and_jsonl(tmp_path, media):
    (tmp_path / "m.csv").write_text(
        f"file_name,caption\n{media}/clip1.mp4,one\n{media}/clip0.mp4,zero\n{media}/clip0.mp4,again\n"
        f"{media}/nocap.mp4,\n"
    )
    items = discover(tmp_path / "m.csv")
    assert [(Path(i.path).name, i.caption) for i in items] == [
        ("clip0.mp4", "zero"),
        ("clip0.mp4", "again"),
        ("clip1.mp4", "one"),
        ("nocap.mp4", None),
    ]
    assert len({i.id for i in items}) == 4  # a file listed twice gets distinct ids
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "m.jsonl").write_text('{"path": "a.png", "text": "x"}\n\n{"path": "b.mp4"}\n')
    items = discover(sub / "m.jsonl")
    assert [(i.id, i.caption, i.media_type) for i in items] == [("a.png", "x", "image"), ("b.mp4", None, "video")]
    assert items[0].path == str(sub / "a.png")  # relative to the manifest
    folder = discover(media, media="image")
    assert [i.id for i in folder] == ["img0.png", "img1.png"] and folder[0].caption == "a photo 0"


# --- videos ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, media, tiny_wan) -> Path:
    out = tmp_path_factory.mktemp("encoded") / "out"
    args = ["videos", "--input", str(media), "--model", str(tiny_wan), "--output", str(out), *SIZE]
    assert main([*args, "--rows-per-shard", "4"]) == 0
    return out


def test_round_trip_shapes_dtypes_metadata_and_skipped(encoded, media, tiny_wan):
    out = encoded
    rows = rows_of(out)
    assert sorted(r["id"] for r in rows) == GOOD
    # 9 sorted inputs, 4 per shard: shard 2 holds only short.mp4, so it has a record but no parquet file
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert json.loads((out / ".preprocess" / "part-00002.json").read_text())["rows"] == 0
    for r in rows:
        video = r["media_type"] == "video"
        assert r["vae_latent_shape"] == ([16, 2, 4, 4] if video else [16, 1, 4, 4])
        assert r["vae_latent_dtype"] == r["text_embedding_dtype"] == "float32"
        length, dim = r["text_embedding_shape"]
        assert 1 <= length <= 16 and dim == 32
        assert (r["width"], r["height"], r["num_frames"]) == (32, 32, 5 if video else 1)
        assert (r["fps"], r["duration_sec"]) == ((8.0, 0.625) if video else (None, None))
        assert r["file_name"] == r["id"] and r["caption"]
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {Path(s["file"]).name: s["reason"] for s in skipped} == BAD

    # the latent is the VAE posterior's mode, un-normalised; the text is the real tokens of encode_prompt
    from diffusers import AutoencoderKLWan, WanPipeline

    row = next(r for r in rows if r["id"] == "clip2.mp4")
    clip = load_clip(media / "clip2.mp4", height=32, width=32, num_frames=5)
    vae = AutoencoderKLWan.from_pretrained(tiny_wan, subfolder="vae")
    with torch.no_grad():
        expected = vae.encode(to_model_input(clip.frames)).latent_dist.mode()[0]
    torch.testing.assert_close(tensor(row, "vae_latent"), expected)
    pipe = WanPipeline.from_pretrained(tiny_wan, transformer=None, vae=None)
    full, _ = pipe.encode_prompt(row["caption"], do_classifier_free_guidance=False, max_sequence_length=16)
    text = tensor(row, "text_embedding")
    torch.testing.assert_close(text, full[0, : text.shape[0]])
    assert not full[0, text.shape[0] :].any()  # only padding was dropped


def test_train_distill_trains_on_the_result(encoded, tmp_path, tiny_wan, tiny_teacher):
    cfg = base_config("finetune", tiny_wan, tiny_teacher, encoded, tmp_path / "run")
    # videos and images have different latent shapes: each batch is drawn from one bucket
    cfg["training"].update(max_train_steps=2, checkpointing_steps=2, train_batch_size=2)
    proc = run_cli("--config", str(write_config(tmp_path / "ft.yaml", cfg)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert [m["iteration"] for m in metrics] == [1, 2] and all(np.isfinite(m["total_loss"]) for m in metrics)


def test_targets_pick_the_closest_aspect_ratio_and_the_longest_length():
    from accel_distill.preprocess.buckets import Targets, parse_sizes

    t = Targets.of(parse_sizes("32x48, 48x32,32x32"), [5, 9])
    assert t.size_for(40, 48) == (32, 32) and t.size_for(50, 70) == (32, 48) and t.size_for(48, 32) == (48, 32)
    assert t.size_for(1000, 1000) == (32, 32) and t.size_for(24, 20) == (32, 32)
    assert Targets.of([(64, 64), (32, 32)], [1]).size_for(40, 40) == (32, 32)  # same aspect: the closer area
    assert (t.frames_for(12), t.frames_for(8), t.frames_for(4)) == (9, 5, None)
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_sizes("32,48")


def test_several_sizes_and_lengths_make_buckets(capsys, tmp_path, media, tiny_wan):
    """Each input goes to the size closest to its aspect ratio and the longest length it has; one bucket
    per latent shape, each shard's rows grouped by shape."""
    root = tmp_path / "in"
    root.mkdir()
    for name in ("clip0.mp4", "clip0.txt", "img0.png", "img0.txt", "img1.png", "img1.txt", "short.mp4", "short.txt"):
        (root / name).write_bytes((media / name).read_bytes())
    write_mp4(root / "tall.mp4", 12, width=32, height=48)
    (root / "tall.txt").write_text("a tall video")
    out = tmp_path / "out"
    args = ["videos", "--input", root, "--model", tiny_wan, "--output", out, "--sizes", "32x48,48x32,32x32"]
    code, stdout, _ = run_main(capsys, *args, "--num-frames", "5,9", "--text-max-length", "16")
    assert code == 0, stdout
    shapes = {r["id"]: (r["vae_latent_shape"], r["height"], r["width"], r["num_frames"]) for r in rows_of(out)}
    assert shapes == {
        "clip0.mp4": ([16, 2, 4, 4], 32, 32, 5),  # 48x40: closest to square; 8 frames: 5
        "tall.mp4": ([16, 3, 6, 4], 48, 32, 9),  # 32x48 portrait; 12 frames: 9
        "img0.png": ([16, 1, 4, 6], 32, 48, 1),  # 70x50 landscape
        "img1.png": ([16, 1, 4, 4], 32, 32, 1),  # 20x24: closest to square
    }
    assert "latent shapes 16x1x4x4: 1, 16x1x4x6: 1, 16x2x4x4: 1, 16x3x6x4: 1" in stdout
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(Path(s["file"]).name, s["reason"]) for s in skipped] == [("short.mp4", "too short")]  # 3 < 5 frames
    stored = [r["vae_latent_shape"] for r in rows_of(out)]
    assert stored == sorted(stored)  # grouped by shape inside the shard: row groups hold one bucket
    stream = LatentStream(str(out), batch_size=1, seed=0, text_max_length=16)
    assert stream.buckets == [(16, 1, 4, 4), (16, 1, 4, 6), (16, 2, 4, 4), (16, 3, 6, 4)]
    code, _, err = run_main(capsys, *args, "--height", "32")
    assert code == 2 and err.strip() == "error: --sizes replaces --height/--width: give one or the other"


def test_strict_and_bad_settings_are_one_error_line(capsys, tmp_path, media, tiny_wan, encoded):
    args = ["videos", "--input", media, "--model", tiny_wan, "--output", tmp_path / "o", *SIZE]
    code, _, err = run_main(capsys, *args, "--strict")
    assert code == 2 and err.startswith("error: ") and "nocap.mp4: missing caption" in err
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "".join(json.dumps({"path": str(media / n), "caption": "c"}) + "\n" for n in ("clip0.mp4", "broken.mp4"))
    )
    code, _, err = run_main(capsys, *args[:2], manifest, *args[3:], "--strict")
    assert code == 2 and "broken.mp4: unreadable" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "part-00000.parquet").exists()
    for bad, words in ((["--num-frames", "6"], "4k+1"), (["--height", "40"], "multiple of 16")):
        code, _, err = run_main(capsys, *args, *bad)
        assert code == 2 and words in err, err
    # the same folder with other settings is refused, not mixed
    code, _, err = run_main(capsys, *args[:5], "--output", encoded, *SIZE, "--fps", "4")
    assert code == 2 and "different settings" in err and "fps" in err


def test_family_without_an_encoder_is_one_error_line(capsys, monkeypatch, tmp_path, media, tiny_wan):
    """Preprocessing asks the registered family for its encoder (Family.media_encoder): a family
    that has none, or an unknown one, is refused by name before anything is written."""
    from accel_distill.families.base import Family
    from accel_distill.registry import FAMILIES, load_builtins

    load_builtins()

    class NoEncoder(Family):  # registered only for this test
        name = "no_encoder"
        load_module = make_adapter = encode_prompts = latent_shape = None

    monkeypatch.setitem(FAMILIES, "no_encoder", NoEncoder)
    args = ["videos", "--input", media, "--model", tiny_wan, "--output", tmp_path / "o", *SIZE]
    code, _, err = run_main(capsys, *args, "--family", "no_encoder")
    assert code == 2 and "--family 'no_encoder': no preprocessing encoder" in err
    code, _, err = run_main(capsys, *args, "--family", "wann")
    assert code == 2 and "unknown family" in err and "wan" in err
    assert not (tmp_path / "o").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_disjoint_shards_then_resume(capsys, tmp_path, media, tiny_wan, encoded):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(free_port()), "-m", "accel_distill.preprocess"]
    args = ["videos", "--input", str(media), "--model", str(tiny_wan), "--output", str(out), *SIZE]
    args += ["--rows-per-shard", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 rows in 5 shard(s)" in proc.stdout and "5 encoded now" in proc.stdout, proc.stdout

    records = {k: json.loads((out / ".preprocess" / f"part-{k:05d}.json").read_text()) for k in range(5)}
    assert {k: r["rank"] for k, r in records.items()} == {0: 0, 1: 1, 2: 0, 3: 1, 4: 0}  # k % world == rank
    ids = [i for r in records.values() for i in r["ids"]]
    skipped = [Path(s["file"]).name for r in records.values() for s in r["skipped"]]
    assert sorted(ids) == GOOD and sorted(ids + skipped) == sorted(GOOD + list(BAD))  # each input exactly once
    rows = rows_of(out)
    assert sorted(r["id"] for r in rows) == GOOD
    # the same bytes as the one-process run: sharding and world size do not change the encoding
    single = {r["id"]: r for r in rows_of(encoded)}
    for r in rows:
        torch.testing.assert_close(tensor(r, "vae_latent"), tensor(single[r["id"]], "vae_latent"))

    # an interrupted run: shard 3 never finished (no record, a half-written temporary file)
    (out / "part-00003.parquet").unlink()
    (out / ".preprocess" / "part-00003.json").unlink()
    (out / ".part-00003.parquet.tmp-999").write_bytes(b"half a shard")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    code, stdout, _ = run_main(capsys, *args)
    assert code == 0 and "1 encoded now, 4 already done" in stdout, stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in before} == before
    assert (out / "part-00003.parquet").exists() and not list(out.glob(".part-*"))
    assert sorted(r["id"] for r in rows_of(out)) == GOOD
    assert sorted(json.loads(s)["reason"] for s in (out / "skipped.jsonl").read_text().splitlines()) == sorted(
        BAD.values()
    )


# --- text only ---------------------------------------------------------------------------


def test_prompts_negative_and_validation_files(capsys, tmp_path, tiny_wan, tiny_teacher):
    from diffusers import WanPipeline

    prompts = ["a red cat", "the blue dog video", "one green cat", "two red dog", "a photo"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    model = ["--model", tiny_wan, "--text-max-length", "16"]
    code, stdout, _ = run_main(
        capsys, "prompts", "--prompts", tmp_path / "p.txt", *model, "--output", tmp_path / "text", "--rows-per-shard", "2",
        "--store-dtype", "bf16",
    )  # fmt: skip
    assert code == 0 and "5 rows in 3 shard(s)" in stdout
    stream = LatentStream(
        str(tmp_path / "text"), batch_size=5, seed=0, shuffle=False, text_max_length=16, require_latents=False
    )
    batch = next(iter(stream))
    assert not stream.has_latents and batch["captions"] == prompts and batch["text_embeds"].dtype == torch.bfloat16
    assert batch["ids"] == [f"prompt-{i:07d}" for i in range(5)]

    pipe = WanPipeline.from_pretrained(tiny_wan, transformer=None, vae=None)
    padded, _ = pipe.encode_prompt(["", *prompts[:2]], do_classifier_free_guidance=False, max_sequence_length=16)
    torch.testing.assert_close(batch["text_embeds"][0].float(), padded[1], atol=2e-2, rtol=2e-2)

    code, _, _ = run_main(capsys, "negative", *model, "--output", tmp_path / "neg.safetensors")
    assert code == 0

    def bad(message):
        raise AssertionError(message)

    neg = load_embedding_file(str(tmp_path / "neg.safetensors"), 16, bad)  # what pipeline_config loads
    torch.testing.assert_close(neg, padded[0])

    (tmp_path / "val.json").write_text(json.dumps({"data": [{"caption": p} for p in prompts[:2]]}))
    code, _, _ = run_main(
        capsys, "validation", "--prompts", tmp_path / "val.json", *model, "--output", tmp_path / "val"
    )
    assert code == 0
    entries = read_prompts(str(tmp_path / "val" / "validation.json"))  # what the validation callback reads
    assert [e.caption for e in entries] == prompts[:2]
    emb = load_embedding(entries[1].embeds_file, 16, "<test>", "val.json")
    torch.testing.assert_close(emb, padded[2])

    # and a data-free DMD2 run uses all three: text-only data, the negative file, the validation file
    cfg = base_config("dmd2", tiny_wan, tiny_teacher, tmp_path / "text", tmp_path / "run")
    cfg["method_config"]["rollout_mode"] = "simulate"
    cfg["pipeline_config"].update(
        num_frames=5, height=32, width=32, negative_prompt_embeds=str(tmp_path / "neg.safetensors")
    )
    cfg["training"].update(
        max_train_steps=2,
        checkpointing_steps=2,
        log_validation=True,
        validation_steps=2,
        validation_dataset_file=str(tmp_path / "val" / "validation.json"),
    )
    proc = run_cli("--config", str(write_config(tmp_path / "dmd2.yaml", cfg)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "run" / "validation" / "step-2").glob("*.png"))) >= 2
    assert not (tmp_path / "run" / "negative_prompt_embeds.safetensors").exists()  # the file was used, not re-encoded
    assert not (tmp_path / "run" / "validation_prompt_embeds.safetensors").exists()
