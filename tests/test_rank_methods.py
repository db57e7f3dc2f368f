"""benchmarks/rank_methods.py's mechanics on a tiny run of the committed video teacher: what it makes,
the table and target lines, the counted teacher forwards, and that a re-run skips finished work.

The ranking itself (400 iterations per method, 400 clips per row) is the benchmark's business.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "models" / "digits-video-wan"


def load_rank_methods():
    spec = importlib.util.spec_from_file_location("rank_methods", ROOT / "benchmarks" / "rank_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(180)
def test_rank_methods_trains_every_method_counts_teacher_forwards_and_skips_finished_work(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread on the shared cores only slows them
    try:
        _check(load_rank_methods(), tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _check(rank, tmp_path: Path, capsys) -> None:
    work = tmp_path / "work"
    args = ["--teacher", str(TEACHER), "--work", str(work), "--iterations", "2", "--num-samples", "8"]
    args += ["--kd-clips", "40", "--kd-teacher-steps", "4", "--teacher-steps", "4", "1", "--train-clips", "200"]
    args += ["--real-data", str(tmp_path / "absent"), "--real-clips", "16", "--split", "validation"]
    args += ["--batch-size", "8"]
    assert rank.main(args) == 0
    out = capsys.readouterr().out
    report = json.loads((work / "rank_methods_validation.json").read_text())
    labels = list(rank.METHODS)
    assert list(report["methods"]) == labels and report["split"] == "validation" and report["iterations"] == 2

    rows = [(r["sampler"], r["steps"]) for r in report["results"]]
    assert rows[:2] == [("teacher (CFG 2)", 4), ("teacher (CFG 2)", 1)]
    for label in labels:
        assert [s for name, s in rows if name == f"{label} student"] == [4, 2, 1]
        export = Path(report["methods"][label]["export"])
        info = json.loads((export / "accel_distill_export.json").read_text())
        assert len(info["timesteps"]) == 4 and (export / "model_index.json").exists()
        assert (export.parent / "config.yaml").exists()  # the resolved recipe it was trained with

    # the data each method read: the 40 captions, the encoded real clips, the generated trajectories
    methods = report["methods"]
    assert Path(methods["DMD2"]["data"]) == work / "data" / "prompts"
    assert Path(methods["DMD2+GAN"]["data"]) == Path(methods["consistency"]["data"]) == work / "real" / "data" / "train"
    assert Path(methods["KD"]["data"]) == work / "data" / "teacher"
    assert len(list((work / "real" / "clips" / "train").glob("*.gif"))) == 16

    # teacher forwards per student update, counted by hooks, as each method's structure says:
    # DMD2 one CFG call (2B rows); + GAN: the generator term (B) and the critic-only iteration's
    # discriminator (real, fake, R1-perturbed: 3B); consistency one CFG ODE step; KD none online,
    # 4 generation steps x 2 (CFG) per generated clip offline
    counted = [(methods[m]["teacher_calls"], methods[m]["teacher_forwards"]) for m in labels]
    assert counted == [(1, 2), (3, 6), (0, 0), (1, 2)]
    assert all(tuple(methods[m]["expected"]) == c for m, c in zip(labels, counted))
    assert methods["KD"]["generation"]["teacher_forwards_per_clip"] == 8

    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| sampler | steps | digit acc. | motion acc. | FD | s / clip | teacher forwards")
    assert len(table) == 1 + len(report["results"]) + len(report["references"])
    gan_row = next(line for line in table if line.startswith("| DMD2+GAN student | 1 |"))
    assert "| 6 (3 calls) |" in gan_row
    assert "per generated clip x 40 clips" in next(line for line in table if line.startswith("| KD student"))
    targets = [line for line in out.splitlines() if line.endswith(("PASS", "FAIL"))]
    assert len(targets) == 2 * len(labels) + 1  # every method at 4 and 1 steps (the teacher rows), the GAN line
    assert targets[-1].startswith("GAN head at 1 step")
    assert all(("PASS" in t) != ("FAIL" in t) for t in targets)

    # a re-run skips every finished piece: the same exports and the same recorded walls
    stamps = {m: Path(methods[m]["export"], "model_index.json").stat().st_mtime_ns for m in ("DMD2", "KD")}
    assert rank.main([*args, "--methods", "DMD2", "KD", "--json", str(tmp_path / "again.json")]) == 0
    out = capsys.readouterr().out
    again = json.loads((tmp_path / "again.json").read_text())["methods"]
    assert list(again) == ["DMD2", "KD"] and out.count(": finished export ") == 2 and "generate:" not in out
    for m in ("DMD2", "KD"):
        assert Path(again[m]["export"], "model_index.json").stat().st_mtime_ns == stamps[m]
        assert again[m]["wall_s"] == methods[m]["wall_s"]
    assert again["KD"]["generation"] == methods["KD"]["generation"]
