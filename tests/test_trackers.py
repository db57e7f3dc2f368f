"""Experiment trackers a run config can name (``training.trackers``), on a real tiny run."""

from __future__ import annotations

import pytest
import yaml
from conftest import base_config, read_metrics, write_config

from accel_distill.cli import main


def test_tensorboard_tracker_writes_the_logged_losses(tmp_path, tiny_wan, tiny_teacher, latent_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    cfg = base_config("finetune", tiny_wan, tiny_teacher, latent_data, out)
    cfg["training"].update(max_train_steps=3, trackers=["tensorboard"], tracker_project_name="tb-run")
    assert main(["--config", str(write_config(tmp_path / "run.yaml", cfg))]) == 0

    run_dir = out / "logs" / "tb-run"
    assert list(run_dir.glob("events.out.tfevents.*")), sorted(p.name for p in run_dir.iterdir())
    events = EventAccumulator(str(run_dir))
    events.Reload()
    rows = read_metrics(out)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for name in ("total_loss", "flow_loss", "grad_norm/student", "lr/student"):
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == [1, 2, 3], name
        assert [s.value for s in scalars] == pytest.approx([r[name] for r in rows], rel=1e-6), name
    # the resolved config is stored with the run
    (hparams,) = run_dir.glob("*/hparams.yml")
    stored = yaml.safe_load(hparams.read_text())
    assert stored["recipe.method"] == "finetune" and stored["training.max_train_steps"] == 3
