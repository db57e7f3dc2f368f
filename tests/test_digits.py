"""The image digits model (the fast tests' model): data split, parquet encoding, the rebuild recipe (few steps),
stock sampling; the committed models load. The video model, the demo and the quality benchmark: test_digits_video.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("sklearn")

from accel_distill.digits import caption  # noqa: E402
from accel_distill.digits.data import load_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_split_is_fixed_by_seed_and_disjoint():
    train, held = load_split("train", seed=0), load_split("held_out", seed=0)
    assert len(train.labels) + len(held.labels) == 1797
    assert not set(train.indices) & set(held.indices)
    assert np.array_equal(load_split("train", seed=0).indices, train.indices)
    assert not np.array_equal(load_split("train", seed=1).indices, train.indices)
    assert train.images.shape[1:] == (3, 1, 16, 16)
    assert train.images.min() >= -1 and train.images.max() <= 1


@pytest.fixture(scope="module")
def fast_build(tmp_path_factory):
    from accel_distill.digits.build import build

    tmp = tmp_path_factory.mktemp("digits")
    out = build(tmp / "model", tmp / "work", fast=True)
    return out, tmp / "work"


@pytest.mark.timeout(600)
def test_rebuild_recipe_runs(fast_build):
    out, work = fast_build
    index = json.loads((out / "model_index.json").read_text())
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert index[name][0] is not None and (out / name).is_dir()
    vae_cfg = json.loads((out / "vae" / "config.json").read_text())
    assert vae_cfg["_class_name"] == "AutoencoderKLWan" and len(vae_cfg["latents_mean"]) == vae_cfg["z_dim"]
    assert (work / "teacher_run" / "export" / "model_index.json").is_file()


@pytest.mark.timeout(600)
def test_parquet_holds_labelled_latents(fast_build):
    """The digits went through `preprocess videos` (PNG + caption files): latents are the VAE's
    posterior mode of exactly the pixels load_split gives, captions follow the labels."""
    from diffusers import AutoencoderKLWan

    from accel_distill.data.schema import bytes_to_tensor
    from accel_distill.digits.vae import encode_mean

    _, work = fast_build
    assert len(list((work / "images" / "train").glob("digit-*.png"))) == 64
    table = pq.read_table(work / "data" / "train" / "part-00000.parquet").to_pylist()
    train = load_split("train", seed=0)
    assert len(table) == 64
    vae = AutoencoderKLWan.from_pretrained(work / "base", subfolder="vae")
    expected = encode_mean(vae, train.images[:8])
    for k, row in enumerate(table[:8]):
        lat = bytes_to_tensor(row["vae_latent_bytes"], row["vae_latent_shape"], row["vae_latent_dtype"])
        emb = bytes_to_tensor(row["text_embedding_bytes"], row["text_embedding_shape"], row["text_embedding_dtype"])
        assert tuple(lat.shape) == (16, 1, 2, 2) and emb.shape[1] == 32 and 1 <= emb.shape[0] <= 16
        torch.testing.assert_close(lat, expected[k], atol=1e-5, rtol=1e-4)
        assert row["caption"] == caption(int(train.labels[k]))
        assert row["id"] == f"digit-{int(train.indices[k]):04d}.png"
    embs = {r["caption"]: r["text_embedding_bytes"] for r in table}
    assert len(embs) > 1 and len(set(embs.values())) == len(embs)  # different prompts, different embeddings


@pytest.mark.timeout(600)
def test_stock_pipeline_samples_digits(fast_build):
    from accel_distill.digits.sample import generate, load_pipeline

    out, _ = fast_build
    imgs = generate(load_pipeline(out), [3, 7], [0, 1], steps=2)
    assert imgs.shape == (2, 16, 16) and imgs.dtype == np.uint8


@pytest.mark.parametrize("name", ["digits-wan", "digits-video-wan"])
def test_committed_model_is_complete(name):
    model = ROOT / "models" / name
    if not (model / "model_index.json").exists():
        pytest.skip(f"models/{name} not present")
    assert sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) <= 20 * 2**20
    assert sum(f.stat().st_size for f in (ROOT / "models").rglob("*") if f.is_file()) <= 30 * 2**20
    # stock diffusers loads every component (real weights, not LFS pointers) and they fit together
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(model)
    index = json.loads((model / "model_index.json").read_text())
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert type(getattr(pipe, name)).__name__ == index[name][1], name
    t, vae = pipe.transformer.config, pipe.vae.config
    assert t.in_channels == t.out_channels == vae.z_dim == len(vae.latents_mean)
    assert t.text_dim == pipe.text_encoder.config.d_model
    assert all(torch.isfinite(p).all() for p in pipe.transformer.parameters())
