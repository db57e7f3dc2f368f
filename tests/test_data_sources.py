"""Data sources: local files / folders / patterns / lists, and Hub dataset repos streamed through
``datasets`` + ``HfFileSystem`` from the loopback Hub (accel_distill.testing.loopback_hub)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, base_config, write_config

from accel_distill.config import load_config
from accel_distill.data import LatentStream, write_parquet
from accel_distill.data.sources import parse_hub_reference, resolve_data_files
from accel_distill.errors import ConfigError, DataError
from accel_distill.testing.datasets import mixed_shape_samples
from accel_distill.testing.loopback_hub import hub_env, serve

PROBE = str(ROOT / "tests" / "launch" / "stream_probe.py")
REPO = "tester/latents"
SHAPES = {(16, 2, 16, 32): 14, (16, 1, 16, 32): 10}  # videos and images, 16-32 kB latents


def write_shards(folder: Path, samples: list[dict], *, per_file: int = 8, row_group_size: int = 3) -> list[Path]:
    paths = []
    for k in range(0, len(samples), per_file):
        paths.append(folder / f"part-{k // per_file:05d}.parquet")
        write_parquet(paths[-1], samples[k : k + per_file], row_group_size=row_group_size)
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """24 mixed-shape samples in 3 files of 8 rows, row groups of 3."""
    folder = tmp_path_factory.mktemp("shards") / "data"
    write_shards(folder, mixed_shape_samples(SHAPES, seed=3))
    return folder


def probe(*args: str, env: dict | None = None, out: Path) -> tuple[subprocess.CompletedProcess, dict | None]:
    proc = subprocess.run(
        [sys.executable, PROBE, *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    result = out / "rank0.json"
    return proc, json.loads(result.read_text()) if proc.returncode == 0 else None


def footer_and_group_bytes(folder: Path, ids: set[str]) -> int:
    """Bytes a streaming reader needs for ``ids``: each file's 64 kB tail plus the row groups holding them."""
    total = 0
    for path in sorted(folder.glob("*.parquet")):
        f = pq.ParquetFile(path)
        total += min(65536, path.stat().st_size)
        for g in range(f.metadata.num_row_groups):
            if ids & set(f.read_row_group(g, columns=["id"]).column(0).to_pylist()):
                rg = f.metadata.row_group(g)
                total += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
    return total


def local_reference(data, steps: int, **kw) -> dict:
    """What stream_probe.py writes, computed in this process."""
    sys.path.insert(0, str(ROOT / "tests" / "launch"))
    from stream_probe import sample_digests

    s = LatentStream(data, batch_size=kw.pop("batch_size", 2), seed=0, text_max_length=8, prefetch=0, **kw)
    it = iter(s)
    seen = {"ids": [], "keys": [], "digests": [], "states": []}
    for _ in range(steps):
        batch = next(it)
        seen["ids"].append(batch["ids"])
        seen["keys"].append([list(k) for k in batch["sample_keys"]])
        seen["digests"].append(sample_digests(batch))
        seen["states"].append(s.state_dict())
    return seen


# -- local ----------------------------------------------------------------------------------


def test_local_files_folders_patterns_and_lists(tmp_path):
    for name in ("d/a.parquet", "d/sub/b.parquet", "d/.hidden/c.parquet", "e.parquet", "d/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".parquet"):
            write_parquet(tmp_path / name, mixed_shape_samples({(16, 1, 2, 2): 2}))
        else:
            (tmp_path / name).write_text("x")
    uris = lambda src: [Path(f.uri).relative_to(tmp_path).as_posix() for f in resolve_data_files(src)]  # noqa: E731
    assert uris(tmp_path / "d") == ["d/a.parquet", "d/sub/b.parquet"]  # hidden folders skipped, as datasets does
    assert uris([str(tmp_path / "e.parquet"), str(tmp_path / "d" / "sub")]) == ["e.parquet", "d/sub/b.parquet"]
    assert uris(str(tmp_path / "d" / "**" / "b*.parquet")) == ["d/sub/b.parquet"]
    with pytest.raises(DataError, match="no parquet files found at .*nope"):
        resolve_data_files([str(tmp_path / "e.parquet"), str(tmp_path / "nope")])
    s = LatentStream([str(tmp_path / "e.parquet"), str(tmp_path / "d")], batch_size=2, seed=0, text_max_length=4)
    assert s.num_samples == 6


@pytest.mark.parametrize(
    "ref,repo,revision,path",
    [
        ("hf://datasets/o/n", "o/n", None, ""),
        ("hf://datasets/o/n@v1.0/latents/77x448x832", "o/n", "v1.0", "latents/77x448x832"),
        ("hf://datasets/o/n@refs/pr/3/data/*.parquet", "o/n", "refs/pr/3", "data/*.parquet"),
        ("hf://datasets/o/n@refs%2Fpr%2F3/data", "o/n", "refs/pr/3", "data"),
    ],
)
def test_hub_references_parse(ref, repo, revision, path):
    r = parse_hub_reference(ref)
    assert (r.repo_id, r.revision, r.path) == (repo, revision, path)


@pytest.mark.parametrize("ref", ["hf://o/n", "hf://datasets/o", "hf://datasets/o@x/n", "hf://datasets/o/n@/x"])
def test_bad_hub_references_are_one_line(ref):
    with pytest.raises(DataError) as e:
        parse_hub_reference(ref)
    assert str(e.value).startswith(ref) and "\n" not in str(e.value)


def test_config_data_path_forms(tmp_path, tiny_wan, shards):
    def load(data_path):
        cfg = base_config("finetune", tiny_wan, tiny_wan, shards, tmp_path / "out")
        cfg["training"]["data_path"] = data_path
        return load_config(str(write_config(tmp_path / "run.yaml", cfg)))

    files = sorted(str(p) for p in shards.glob("*.parquet"))
    assert load([files[0], str(shards), "hf://datasets/o/n@v1/x"]).training.data_path[1] == str(shards)
    assert load(str(shards / "part-*.parquet")).training.data_path == str(shards / "part-*.parquet")
    assert load(files[0]).training.data_path == files[0]
    for bad, message in [
        ([files[0], str(tmp_path / "missing")], r"training\.data_path\[1\]: path does not exist: .*missing"),
        ([], r"training\.data_path: the list is empty"),
        (5, r"training\.data_path: expected a string, got int 5"),
        ([files[0], 3], r"training\.data_path\[1\]: expected a string"),
        (str(tmp_path / "*.parquet"), r"training\.data_path: no file matches the pattern"),
        ("hf://models/o/n", r"training\.data_path: hf://models/o/n: only Hub dataset repos"),
    ]:
        with pytest.raises(ConfigError, match=message) as e:
            load(bad)
        assert "\n" not in str(e.value)


# -- the loopback Hub ---------------------------------------------------------------------------


def test_hub_stream_equals_the_local_files_and_reads_byte_ranges(shards, tmp_path):
    files = {f"latents/{p.name}": p for p in sorted(shards.glob("*.parquet"))}
    total = sum(p.stat().st_size for p in files.values())
    reference = local_reference(str(shards), steps=14)  # 12 batches per epoch
    with serve() as hub:
        hub.add_dataset(REPO, {**files, "README.md": b"# latents\n"}, tag="v1")
        env = hub_env(hub, tmp_path / "home")
        proc, seen = probe("--data", f"hf://datasets/{REPO}@v1/latents", "--steps", "3", env=env, out=tmp_path / "a")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not hub.unexpected, hub.unexpected
        for key in ("ids", "keys", "digests", "states"):
            assert seen[key] == reference[key][:3], key
        # streamed: each footer (pyarrow reads the last 64 kB) and the row groups 3 batches touch, no more
        read_ahead = reference["ids"][:5]  # the probe's prefetch thread reads 2 batches ahead
        needed = footer_and_group_bytes(shards, {i for b in read_ahead for i in b})
        assert hub.range_requests > 0 and hub.bytes_served <= needed + 4096 and needed < total

        # exact resume from the Hub, mixing a Hub file with local ones, across the epoch boundary
        Path(tmp_path / "state.json").write_text(json.dumps(seen["states"][2]))
        mixed = [f"hf://datasets/{REPO}@v1/latents/part-00000.parquet", str(shards / "part-00001.parquet")]
        mixed += [str(shards / "part-00002.parquet")]
        resume = ["--load-state", str(tmp_path / "state.json"), "--steps", "11"]
        proc, resumed = probe("--data", *mixed, *resume, env=env, out=tmp_path / "b")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert resumed["ids"] == reference["ids"][3:] and resumed["digests"] == reference["digests"][3:]


def test_hub_revision_is_pinned_when_the_stream_starts(shards, tmp_path):
    files = {f"latents/{p.name}": p for p in sorted(shards.glob("*.parquet"))}
    reference = local_reference(str(shards), steps=12)
    with serve() as hub:
        first = hub.add_dataset(REPO, files)
        extra = mixed_shape_samples({(16, 1, 4, 4): 6}, seed=9)
        write_parquet(tmp_path / "extra.parquet", extra)

        def move_main(method, path):  # a push lands on main while the run lists its files
            if "/tree/" in path and hub.commit_files(REPO, "main")[0] == first:
                hub.add_dataset(REPO, {**files, "latents/part-00003.parquet": tmp_path / "extra.parquet"})

        hub.on_request.append(move_main)
        proc, seen = probe(
            "--data",
            f"hf://datasets/{REPO}/latents",
            "--steps",
            "12",
            env=hub_env(hub, tmp_path / "h"),
            out=tmp_path / "p",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert hub.commit_files(REPO, "main")[0] != first  # main did move
        assert seen["ids"] == reference["ids"]  # but every file was read at the commit main named at start
        assert all(first in p for m, p in hub.requests if "/resolve/" in p)


ERRORS = """
import json, sys
from accel_distill.data import LatentStream
from accel_distill.errors import UserError
out = []
for ref in sys.argv[1:]:
    try:
        LatentStream(ref, batch_size=1, seed=0, text_max_length=8)
        out.append("no error")
    except UserError as e:
        out.append(str(e))
print(json.dumps(out))
"""


def test_hub_errors_are_one_line(shards, tmp_path):
    cases = {
        "hf://datasets/nobody/nothing": "hf://datasets/nobody/nothing: cannot open the Hub dataset: no dataset repo "
        "nobody/nothing (a private one needs HF_TOKEN)",
        f"hf://datasets/{REPO}@v9": f"hf://datasets/{REPO}@v9: cannot open the Hub dataset: revision 'v9' not found",
        f"hf://datasets/{REPO}/nowhere": f"no parquet files found at hf://datasets/{REPO}/nowhere",
    }
    with serve() as hub:
        hub.add_dataset(REPO, {"latents/a.parquet": next(shards.glob("*.parquet"))})
        env = {**os.environ, "PYTHONPATH": str(ROOT), **hub_env(hub, tmp_path / "h")}
        proc = subprocess.run(
            [sys.executable, "-c", ERRORS, *cases], capture_output=True, text=True, env=env, timeout=120
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == list(cases.values())


def test_text_and_latent_values_survive_the_hub(shards):
    """The probe's digests are of the stored bytes: check the local reader against the samples themselves."""
    samples = {s["id"]: s for s in mixed_shape_samples(SHAPES, seed=3)}
    batch = next(iter(LatentStream(str(shards), batch_size=4, seed=0, text_max_length=8, prefetch=0)))
    for i, sid in enumerate(batch["ids"]):
        assert torch.equal(batch["latents"][i], samples[sid]["latent"])
