"""Mixed precision on CPU: bf16 autocast really on, the recipe-vs-launcher precision rule, fp16 loss scaling.

* bf16 finetune and DMD2, each with EMA + validation + LoRA, in process: forward hooks on the
  fp32 layers that train see bf16 outputs (they could not without autocast);
* bf16 DMD2 + EMA on 2 processes, DDP and FSDP2 (through the test-only ``tests/launch/fsdp_cpu.py``);
* which precision wins when the recipe and ``accelerate launch`` disagree;
* fp16 dynamic loss scaling across an overflowed iteration. accelerate makes no ``GradScaler`` and no
  autocast for fp16 on CPU, so that test gives the accelerator torch's CPU ones, as accelerate does on a GPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import base_config, metrics_by_iteration, run_cli, write_config
from launching import backend_launch, launch
from safetensors.torch import load_file

import accel_distill.run
from accel_distill.config import load_config

LAUNCH_ENV = "ACCELERATE_MIXED_PRECISION"  # what accelerate launch --mixed_precision sets
CAPTIONS = ["a red cat", "two blue dog"]


@pytest.fixture
def fresh_accelerate(monkeypatch):
    """accelerate keeps one process-wide state whose precision cannot change: start and leave it empty."""
    monkeypatch.delenv(LAUNCH_ENV, raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def finite_rows(out: Path, iterations: int) -> dict[int, dict]:
    """metrics.jsonl of iterations 1..N, every logged value finite."""
    rows = metrics_by_iteration(out)
    assert sorted(rows) == list(range(1, iterations + 1))
    assert all(torch.isfinite(torch.tensor(v)) for r in rows.values() for v in r.values()), rows
    return rows


def trainable_linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    """The ``nn.Linear`` layers whose own weight trains (fp32 master weights; LoRA adapters included)."""
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]


def on_build(monkeypatch, setup: Callable) -> None:
    """Call ``setup(runtime)`` on the runtime the next in-process run builds, before it trains."""
    build = accel_distill.run.build_runtime

    def build_and_setup(cfg):
        rt = build(cfg)
        setup(rt)
        return rt

    monkeypatch.setattr(accel_distill.run, "build_runtime", build_and_setup)


class Watch:
    """Records, in every ``train_step``, the CPU autocast dtype and the output dtypes of the layers that train."""

    def __init__(self, monkeypatch):
        self.autocast: list[torch.dtype | None] = []  # per train_step; None when autocast is off
        self.outputs: dict[str, set[torch.dtype]] = {}  # role -> dtypes its trainable layers produced
        self.rt = None
        self.inside = False
        on_build(monkeypatch, self.setup)

    def setup(self, rt) -> None:
        self.rt = rt
        for name, role in rt.bundle.trainable.items():
            self.outputs[name] = set()
            for layer in trainable_linears(role.transformer):
                layer.register_forward_hook(self.hook(name))
        train_step = rt.method.train_step

        def watched(batch, iteration):
            self.autocast.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            self.inside = True
            try:
                return train_step(batch, iteration)
            finally:
                self.inside = False

        rt.method.train_step = watched

    def hook(self, role: str):
        def record(module, args, output):
            if self.inside:  # validation sampling is not a training forward
                self.outputs[role].add(output.dtype)

        return record


def bf16_config(method: str, tmp_path: Path, tiny_wan, tiny_teacher, latent_data) -> dict:
    """``method`` at bf16 with a LoRA student, its EMA, and validation at the end (iteration 2)."""
    prompts = tmp_path / "val.json"
    prompts.write_text(json.dumps({"data": [{"caption": c} for c in CAPTIONS]}))
    cfg = base_config(method, tiny_wan, tiny_teacher, latent_data, tmp_path / "out")
    cfg["roles"]["student"].update(lora={"rank": 4}, ema={"decay": 0.9}, learning_rate=1e-2)
    cfg["pipeline_config"].update(num_frames=5, height=32, width=32)
    cfg["training"].update(
        mixed_precision="bf16",
        max_train_steps=2,
        log_validation=True,
        validation_steps=2,
        validation_dataset_file=str(prompts),
    )
    if method == "finetune":
        cfg["training"]["validation_sampling_steps"] = [2]
    return cfg


@pytest.mark.parametrize("method", ["finetune", "dmd2"])
def test_bf16_autocast_with_lora_ema_and_validation(
    method, tmp_path, monkeypatch, fresh_accelerate, tiny_wan, tiny_teacher, latent_data
):
    cfg = bf16_config(method, tmp_path, tiny_wan, tiny_teacher, latent_data)
    watch = Watch(monkeypatch)
    export = accel_distill.run.train(load_config(str(write_config(tmp_path / "run.yaml", cfg))))
    out = tmp_path / "out"

    # autocast was on in every train_step, and the fp32 layers that train computed in bf16
    expected_roles = {"student"} if method == "finetune" else {"student", "critic"}
    assert set(watch.outputs) == expected_roles
    assert all(watch.outputs[r] == {torch.bfloat16} for r in expected_roles), watch.outputs
    assert watch.autocast == [torch.bfloat16, torch.bfloat16]
    assert watch.rt.accelerator.mixed_precision == "bf16"

    assert all(r["skipped_steps"] == 0 for r in finite_rows(out, 2).values())
    assert sorted(p.name for p in (out / "validation" / "step-2").glob("*.png")) == [
        f"{i}_{2 if method == 'finetune' else 3}steps_g1.png" for i in range(len(CAPTIONS))
    ]

    # the exported (EMA) adapter moved away from its B = 0 start and loads in stock diffusers
    adapter = load_file(export / "pytorch_lora_weights.safetensors")
    assert adapter and all("lora" in k for k in adapter)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert json.loads((export / "accel_distill_export.json").read_text())["ema"] is True
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_wan)
    pipe.load_lora_weights(export)
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}
    if method == "dmd2":  # the critic trains in full: its checkpointed weights moved
        base = load_file(tiny_wan / "transformer" / "diffusion_pytorch_model.safetensors")
        critic = load_file(out / "checkpoints" / "checkpoint-2" / "model_1.safetensors")
        assert any(not torch.equal(critic[k], base[k]) for k in base)


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_bf16_dmd2_with_ema_on_two_processes(backend, tmp_path, tiny_wan, tiny_teacher, latent_data):
    out = tmp_path / "out"
    cfg = base_config("dmd2", tiny_wan, tiny_teacher, latent_data, out)
    cfg["roles"]["student"]["ema"] = {"decay": 0.9}
    cfg["training"].update(mixed_precision="bf16", max_train_steps=2, checkpointing_steps=2)
    accelerate_config, script = backend_launch(backend)
    launch(accelerate_config, script, "--config", str(write_config(tmp_path / "run.yaml", cfg)), mixed_precision="bf16")

    assert all(r["skipped_steps"] == 0 for r in finite_rows(out, 2).values())
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert sorted(p.name for p in ckpt.glob("rank_state_*.pt")) == ["rank_state_0.pt", "rank_state_1.pt"]  # 2 ranks
    assert (ckpt / ("pytorch_model_fsdp_0" if backend == "fsdp" else "model.safetensors")).exists()
    from diffusers import WanTransformer3DModel

    exported = WanTransformer3DModel.from_pretrained(out / "export", subfolder="transformer")
    base = load_file(tiny_wan / "transformer" / "diffusion_pytorch_model.safetensors")
    weights = exported.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(not torch.equal(weights[k], base[k]) for k in base)  # the (EMA) student moved
    assert json.loads((out / "export" / "accel_distill_export.json").read_text())["ema"] is True


def plan_line(stdout: str) -> str:
    (line,) = [x for x in stdout.splitlines() if x.startswith("training: ")]
    return line


def test_launcher_precision_wins_when_the_recipe_leaves_it_unset(
    tmp_path, monkeypatch, fresh_accelerate, tiny_wan, tiny_teacher, latent_data
):
    cfg = base_config("finetune", tiny_wan, tiny_teacher, latent_data, tmp_path / "out")
    cfg["training"]["max_train_steps"] = 1
    path = str(write_config(tmp_path / "run.yaml", cfg))
    proc = run_cli("--config", path, "--dry-run", env={LAUNCH_ENV: "bf16"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixed precision bf16" in plan_line(proc.stdout)
    # and the run trains at bf16: the fp32 student computes in bf16 under autocast
    monkeypatch.setenv(LAUNCH_ENV, "bf16")
    watch = Watch(monkeypatch)
    accel_distill.run.train(load_config(path))
    assert watch.autocast == [torch.bfloat16] and watch.outputs == {"student": {torch.bfloat16}}


def test_recipe_and_launcher_precisions_that_differ_are_one_error_line(tmp_path, tiny_wan, tiny_teacher, latent_data):
    out = tmp_path / "out"
    cfg = base_config("finetune", tiny_wan, tiny_teacher, latent_data, out)
    cfg["training"]["mixed_precision"] = "fp16"
    proc = run_cli("--config", str(write_config(tmp_path / "run.yaml", cfg)), env={LAUNCH_ENV: "bf16"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "training.mixed_precision" in lines[0], proc.stderr
    assert "fp16" in lines[0] and "bf16" in lines[0], lines[0]
    assert not out.exists()  # refused before any model (or the negative prompt cache) was loaded


def test_mixed_precision_no_on_the_command_line_is_accepted(tmp_path, tiny_wan, tiny_teacher, latent_data):
    """YAML reads an unquoted ``no`` as false; ``training.mixed_precision=no`` still means no mixed precision."""
    cfg = base_config("finetune", tiny_wan, tiny_teacher, latent_data, tmp_path / "out")
    proc = run_cli(
        "--config", str(write_config(tmp_path / "run.yaml", cfg)), "--dry-run", "training.mixed_precision=no"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixed precision no" in plan_line(proc.stdout)


def fp16_on_cpu(monkeypatch) -> None:
    """TEST-ONLY: give the accelerator the fp16 ``GradScaler`` and autocast it makes on a GPU, on the CPU.

    For fp16 on CPU accelerate leaves ``scaler`` None and ``native_amp`` False (no error: fp16 would train
    in fp32, which the builder refuses); torch has both for CPU. Set before any ``prepare``, so the
    optimizer wrapper, ``backward`` and ``unscale_gradients`` take accelerate's own fp16 path.
    """
    import accel_distill.builder as builder

    make = builder.Accelerator

    def accelerator(*args, **kwargs):
        acc = make(*args, **kwargs)
        if acc.mixed_precision == "fp16" and acc.scaler is None:
            acc.native_amp = True
            acc.scaler = torch.amp.GradScaler("cpu")
        return acc

    monkeypatch.setattr(builder, "Accelerator", accelerator)


OVERFLOW_AT = 1  # the (0-based) iteration whose loss is scaled by 1e30: its fp16 gradients overflow


def test_fp16_overflow_is_skipped_and_lowers_the_loss_scale(
    tmp_path, monkeypatch, fresh_accelerate, tiny_wan, tiny_teacher, latent_data
):
    fp16_on_cpu(monkeypatch)
    scales, autocast = [], []

    def overflow_once(rt) -> None:
        train_step = rt.method.train_step

        def step(batch, iteration):
            scales.append(rt.accelerator.scaler.get_scale())  # the scale this iteration's backward uses
            autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
            losses, extra = train_step(batch, iteration)
            if iteration == OVERFLOW_AT:  # a finite loss whose scaled fp16 gradients are not
                losses = {**losses, "total_loss": losses["total_loss"] * 1e30}
            return losses, extra

        rt.method.train_step = step

    on_build(monkeypatch, overflow_once)
    out = tmp_path / "out"
    cfg = base_config("finetune", tiny_wan, tiny_teacher, latent_data, out)
    cfg["training"].update(mixed_precision="fp16", max_train_steps=4, checkpointing_steps=1)
    export = accel_distill.run.train(load_config(str(write_config(tmp_path / "run.yaml", cfg))))

    assert autocast == [torch.float16] * 4
    rows = metrics_by_iteration(out)
    assert [rows[i]["skipped_steps"] for i in (1, 2, 3, 4)] == [0, 1, 1, 1]  # only the overflow is skipped
    assert not torch.isfinite(torch.tensor(rows[2]["grad_norm/student"]))
    assert all(torch.isfinite(torch.tensor(v)) for i in (1, 3, 4) for v in rows[i].values()), rows
    # the scaler backed off once, at the overflow, and training went on at the lower scale
    assert scales[1] == scales[0] and scales[2] == scales[3] == scales[1] / 2, scales

    def weights(i: int) -> dict[str, torch.Tensor]:
        return load_file(out / "checkpoints" / f"checkpoint-{i}" / "model.safetensors")

    w = [weights(i) for i in (1, 2, 3)]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])  # the overflowed iteration did not update
    assert any(not torch.equal(w[1][k], w[2][k]) for k in w[1])  # the next one did
    # the lowered scale is logged and checkpointed; an overflow with a finite loss is not divergence
    assert rows[2]["loss_scale"] == scales[2] < rows[1]["loss_scale"]
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert torch.load(ckpt / "scaler.pt", weights_only=False)["scale"] == scales[2]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1 and state["consecutive_nonfinite"] == 0
    exported = load_file(export / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(v).all() for v in exported.values())
