"""``accelerate launch`` of 2 CPU processes (gloo), for the distributed tests.

FSDP runs go through ``tests/launch/fsdp_cpu.py``, a test-only shim that keeps
accelerate's FSDP plugin on CPU so the project's own FSDP2 path is what runs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

FSDP_SHIM = str(ROOT / "tests" / "launch" / "fsdp_cpu.py")
TRAIN = str(ROOT / "train_distill.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    accelerate_config: str,
    script: str,
    *args: str,
    env: dict | None = None,
    mixed_precision: str = "no",
    check: bool = True,
) -> subprocess.CompletedProcess:
    """``accelerate launch`` with 2 CPU processes, as the README documents (mixed precision off unless asked)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / accelerate_config)]
    cmd += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", mixed_precision]
    cmd += ["--main_process_port", str(free_port()), script, *args]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def backend_launch(backend: str) -> tuple[str, str]:
    """(accelerate config, script) of a backend: DDP runs train_distill.py, FSDP the CPU shim."""
    if backend == "ddp":
        return "accelerate_configs/ddp8.yaml", TRAIN
    return "accelerate_configs/fsdp8.yaml", FSDP_SHIM


def straight_then_resumed(
    backend: str, config: Path, straight: Path, resumed: Path, at: int, env: dict | None = None
) -> None:
    """Run the config to the end, then again from its checkpoint at iteration ``at`` into ``resumed``."""
    accelerate_config, script = backend_launch(backend)
    launch(accelerate_config, script, "--config", str(config), env=env)
    ckpt = straight / "checkpoints" / f"checkpoint-{at}"
    launch(
        accelerate_config,
        script,
        "--config",
        str(config),
        f"training.output_dir={resumed}",
        f"training.resume_from_checkpoint={ckpt}",
    )
