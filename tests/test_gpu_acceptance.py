"""``benchmarks/gpu_acceptance.py --device cpu --tiny``: the GPU acceptance checks, on a CPU with tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

CHECKS = [
    "model",
    "finetune",
    "finetune validation",
    "finetune resume",
    "finetune export",
    "dmd2",
    "dmd2 validation",
    "dmd2 resume",
    "dmd2 export",
    "stock WanPipeline sampling",
    "stock WanPipeline + LoRA file",
    "timing 61x448x832",
    "timing 5x32x32 native compile off",
    "timing 5x32x32 native compile off host syncs",
    "timing 5x32x32 native compile on",
    "timing 5x32x32 native compile on host syncs",
    "timing 5x32x32 native compile on agrees",
    "timing 5x32x32 flash compile off",
    "timing 5x32x32 flash compile on",
    "speed target",
    "peak memory",
]
SKIPPED = {
    "timing 61x448x832",
    "timing 5x32x32 flash compile off",
    "timing 5x32x32 flash compile on",
    "timing 5x32x32 native compile off host syncs",
    "timing 5x32x32 native compile on host syncs",
    "speed target",
}
KEYS = {
    "mode",
    "device",
    "device_name",
    "torch",
    "diffusers",
    "fastvideo_reference_s",
    "target_s",
    "model",
    "checks",
    "runs",
    "timing",
    "seconds",
    "passed",
}
TIMING_KEYS = {"size", "latent", "attention", "compile", "s_per_sample_iteration", "student_update_s", "critic_only_s"}


def test_tiny_cpu_acceptance_passes_every_check(tmp_path):
    out, report = tmp_path / "acceptance", tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance.py"), "--device", "cpu", "--tiny"]
    proc = subprocess.run(
        [*cmd, "--out", str(out), "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=540,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS ", "FAIL ", "SKIP "))]
    data = json.loads(report.read_text())

    assert KEYS <= data.keys() and data["passed"] is True and data["mode"] == "tiny"
    assert [c["name"] for c in data["checks"]] == CHECKS
    assert [f"{c['status']} {c['name']}: {c['detail']}" for c in data["checks"]] == lines  # one line per check
    for check in data["checks"]:
        assert check["status"] == ("SKIP" if check["name"] in SKIPPED else "PASS"), check
        assert check["detail"]  # a SKIP says why
    assert "bitwise equal" in next(c["detail"] for c in data["checks"] if c["name"] == "stock WanPipeline sampling")
    assert all("every loss bitwise equal" in c["detail"] for c in data["checks"] if c["name"].endswith("resume"))

    assert data["model"]["parameters"] > 0 and data["model"]["config"]["num_layers"] == 2
    timed = [t for t in data["timing"] if t["ok"]]
    assert [(t["attention"], t["compile"]) for t in timed] == [("native", False), ("native", True)]
    for t in timed:
        assert TIMING_KEYS <= t.keys() and t["s_per_sample_iteration"] > 0 and t["latent"] == [16, 2, 4, 4]
    expected_runs = {"finetune", "dmd2", "finetune-resumed", "dmd2-resumed", "stock", "ours"}
    assert expected_runs <= data["runs"].keys()
    assert all(
        r["exit"] == 0 and r["peak_rss_bytes"] > 0 and r["peak_gpu_bytes"] is None for r in data["runs"].values()
    )
    assert proc.stdout.splitlines()[-1].startswith("RESULT gpu_acceptance tiny on cpu: 15 passed, 0 failed, 6 skipped")


def test_embedded_config_is_the_real_wan21_1_3b_transformer():
    """The 1.3B config the GPU mode builds: 1,418,996,800 parameters, computed on the meta device."""
    import torch
    from diffusers import WanTransformer3DModel

    from benchmarks.gpu_acceptance_runs import WAN21_T2V_1_3B

    with torch.device("meta"):
        model = WanTransformer3DModel(**WAN21_T2V_1_3B)
    assert sum(p.numel() for p in model.parameters()) == 1_418_996_800
    inner = WAN21_T2V_1_3B["num_attention_heads"] * WAN21_T2V_1_3B["attention_head_dim"]
    assert inner == 1536 and len(model.blocks) == 30
