"""Buckets with real processes: 2 ranks reading a Hub dataset see what 1 process sees and resume its
position exactly; mixed image + video training at batch > 1 resumes exactly and matches 2 processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, base_config, read_metrics, run_cli, write_config
from launching import TRAIN, launch

from accel_distill.data import LatentStream, write_parquet
from accel_distill.testing.datasets import mixed_shape_samples
from accel_distill.testing.loopback_hub import hub_env, serve

PROBE = str(ROOT / "tests" / "launch" / "stream_probe.py")
VIDEO, IMAGE, WIDE = (16, 2, 4, 4), (16, 1, 4, 4), (16, 2, 4, 6)


def reference(data, steps: int, batch: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests" / "launch"))
    from stream_probe import sample_digests

    s = LatentStream(data, batch_size=batch, seed=0, text_max_length=8, prefetch=0)
    it = iter(s)
    seen = {"ids": [], "digests": [], "states": []}
    for _ in range(steps):
        b = next(it)
        seen["ids"].append(b["ids"])
        seen["digests"].append(sample_digests(b))
        seen["states"].append(s.state_dict())
    return seen


def test_two_ranks_stream_buckets_from_the_hub_like_one_process(tmp_path):
    folder = tmp_path / "data"
    samples = mixed_shape_samples({VIDEO: 13, IMAGE: 9, WIDE: 3}, seed=5)
    for k in range(0, len(samples), 9):
        write_parquet(folder / f"part-{k // 9:05d}.parquet", samples[k : k + 9], row_group_size=4)
    single = reference(str(folder), steps=16, batch=4)  # 5 batches per epoch: crosses 3 epochs with carry
    with serve() as hub:
        hub.add_dataset("tester/mixed", {f"latents/{p.name}": p for p in folder.glob("*.parquet")})
        env = hub_env(hub, tmp_path / "home")
        source = "hf://datasets/tester/mixed/latents"
        args = ["--data", source, "--batch-size", "2"]
        launch("accelerate_configs/ddp8.yaml", PROBE, *args, "--steps", "8", "--out", str(tmp_path / "two"), env=env)
        ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
        for step in range(8):
            assert ranks[0]["ids"][step] + ranks[1]["ids"][step] == single["ids"][step]
            assert ranks[0]["digests"][step] + ranks[1]["digests"][step] == single["digests"][step]
            assert ranks[0]["states"][step] == ranks[1]["states"][step] == {**single["states"][step], "world_size": 2}
        assert any("fewer than a global batch" in line for line in ranks[0]["buckets"])  # WIDE: 3 < 4
        # rank 0 pinned the branch to a commit and told rank 1 (a push between the two cannot split them)
        assert sum(p.split("?")[0] == "/api/datasets/tester/mixed" for _, p in hub.requests) == 1

        # the position one process saved after its 9th batch (epoch 1, rows carried in) resumes in two
        (tmp_path / "state.json").write_text(json.dumps(single["states"][8]))
        resume = ["--steps", "7", "--load-state", str(tmp_path / "state.json"), "--out", str(tmp_path / "resumed")]
        launch("accelerate_configs/ddp8.yaml", PROBE, *args, *resume, env=env)
        ranks = [json.loads((tmp_path / "resumed" / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [a + b for a, b in zip(ranks[0]["ids"], ranks[1]["ids"])] == single["ids"][9:16]
        assert not hub.unexpected


def metrics(out: Path) -> dict[int, dict]:
    rows = read_metrics(out)
    return {r.pop("iteration"): {k: v for k, v in r.items() if k != "step_time"} for r in rows}


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> Path:
    """Videos, images and a wide video bucket (2 samples, fewer than a global batch of 4)."""
    path = tmp_path_factory.mktemp("mixed") / "mixed.parquet"
    write_parquet(path, mixed_shape_samples({VIDEO: 7, IMAGE: 5, WIDE: 2}, text_dim=32, seed=2), row_group_size=4)
    return path


def mixed_config(out: Path, model: Path, data: Path, batch: int) -> dict:
    cfg = base_config("finetune", model, model, data, out)
    cfg["training"].update(max_train_steps=6, checkpointing_steps=3, train_batch_size=batch)
    return cfg


def test_mixed_image_video_training_resumes_exactly_and_matches_two_processes(tmp_path, tiny_wan, mixed_data):
    straight, resumed, two = tmp_path / "straight", tmp_path / "resumed", tmp_path / "two"
    config = write_config(tmp_path / "one.yaml", mixed_config(straight, tiny_wan, mixed_data, batch=4))
    proc = run_cli("--config", str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bucket 16x2x4x6: 2 samples, fewer than a global batch of 4" in proc.stderr  # reported, not dropped

    cfg = mixed_config(resumed, tiny_wan, mixed_data, batch=4)
    cfg["training"]["resume_from_checkpoint"] = str(straight / "checkpoints" / "checkpoint-3")
    proc = run_cli("--config", str(write_config(tmp_path / "resume.yaml", cfg)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics(straight), metrics(resumed)
    assert sorted(b) == [4, 5, 6] and {i: a[i] for i in b} == b

    two_config = write_config(tmp_path / "two.yaml", mixed_config(two, tiny_wan, mixed_data, batch=2))
    launch("accelerate_configs/ddp8.yaml", TRAIN, "--config", str(two_config))
    c = metrics(two)
    for i in range(1, 7):
        assert c[i]["total_loss"] == pytest.approx(a[i]["total_loss"], rel=1e-5), i
