"""LoRA students (adapter-only checkpoints, diffusers LoRA export) and EMA (fp32, optimizer-paced, resumable)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_config, run_cli, write_config
from safetensors.torch import load_file

from accel_distill.builder import build_runtime
from accel_distill.config import load_config
from accel_distill.config.schema import LoraSpec
from accel_distill.ema import EMACallback
from accel_distill.errors import UserError
from accel_distill.roles import lora_config
from accel_distill.sampling import few_step_sample
from accel_distill.schedule import fit_few_step_schedule
from accel_distill.trainer import Trainer

LORA = {"rank": 4, "alpha": 8, "init": "gaussian", "export_merged": True}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_wan, tiny_teacher, latent_data):
    tmp = tmp_path_factory.mktemp("lora")
    cfg = base_config("dmd2", tiny_wan, tiny_teacher, latent_data, tmp / "out")
    cfg["roles"]["student"]["lora"] = LORA
    cfg["roles"]["student"]["learning_rate"] = 1e-2  # move the adapter visibly in 4 steps
    proc = run_cli("--config", str(write_config(tmp / "run.yaml", cfg)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out"


def sample(predict, embeds: torch.Tensor) -> torch.Tensor:
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    with torch.no_grad():
        return few_step_sample(predict, fit_few_step_schedule([1000, 757, 522]), noise)


def stock_sample(pipe, embeds: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(11)
    return pipe(
        prompt_embeds=embeds,
        num_inference_steps=3,
        guidance_scale=1.0,
        height=32,
        width=32,
        num_frames=5,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames


def test_lora_checkpoints_hold_only_the_adapter(lora_run):
    student = load_file(lora_run / "checkpoints" / "checkpoint-4" / "model.safetensors")
    critic = load_file(lora_run / "checkpoints" / "checkpoint-4" / "model_1.safetensors")
    assert student and all(".lora_A." in k or ".lora_B." in k for k in student)
    assert not any("lora" in k for k in critic)  # the critic trains in full
    info = json.loads((lora_run / "export" / "accel_distill_export.json").read_text())
    assert info["adapter"] == "lora" and info["merged"] is True and info["method"] == "dmd2"


def test_lora_export_loads_in_stock_diffusers_and_reproduces_the_student(lora_run, tiny_wan):
    from diffusers import FlowMatchLCMScheduler, WanPipeline, WanTransformer3DModel

    embeds = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(3))
    # the trained student: base weights + the adapter exactly as checkpointed
    student = WanTransformer3DModel.from_pretrained(tiny_wan, subfolder="transformer")
    student.add_adapter(lora_config(LoraSpec(**{k: v for k, v in LORA.items() if k != "export_merged"})))
    adapter = load_file(lora_run / "checkpoints" / "checkpoint-4" / "model.safetensors")
    result = student.load_state_dict(adapter, strict=False)
    assert not result.unexpected_keys
    ours = sample(
        lambda x, t: student(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0], embeds
    )

    base = WanPipeline.from_pretrained(tiny_wan)
    base.set_progress_bar_config(disable=True)
    untouched = stock_sample(base, embeds)
    base.load_lora_weights(lora_run / "export")  # pytorch_lora_weights.safetensors, the diffusers way
    base.scheduler = FlowMatchLCMScheduler.from_pretrained(lora_run / "export", subfolder="scheduler")
    with_lora = stock_sample(base, embeds)
    torch.testing.assert_close(with_lora, ours, rtol=0, atol=1e-5)
    assert (with_lora - untouched).abs().max() > 1e-3  # the adapter changed the model

    merged = WanPipeline.from_pretrained(lora_run / "export")  # the fused, self-contained pipeline
    merged.set_progress_bar_config(disable=True)
    torch.testing.assert_close(stock_sample(merged, embeds), ours, rtol=0, atol=1e-4)


def test_ema_shadow_is_fp32_and_moves_only_when_its_optimizer_steps(tmp_path, tiny_wan, tiny_teacher, latent_data):
    cfg = base_config("dmd2", tiny_wan, tiny_teacher, latent_data, tmp_path / "out")
    cfg["roles"]["student"].update(precision="bf16", ema={"decay": 0.5})
    cfg["method_config"]["generator_update_interval"] = 3
    rt = build_runtime(load_config(str(write_config(tmp_path / "run.yaml", cfg))))
    ema = EMACallback(rt.bundle, {"student": load_config(str(tmp_path / "run.yaml")).roles["student"].ema})
    assert all(s.dtype == torch.float32 for s in ema.emas["student"].shadow_params)
    trainer = Trainer(rt.accelerator, rt.method, iter(rt.stream), rt.method.cfg.training, callbacks=[ema])
    changed = []
    for _ in range(7):
        before = [s.clone() for s in ema.emas["student"].shadow_params]
        trainer.step()
        changed.append(any(not torch.equal(a, b) for a, b in zip(before, ema.emas["student"].shadow_params)))
    assert changed == [True, False, False, True, False, False, True]
    assert ema.emas["student"].optimization_step == 3
    # a checkpoint without this role's EMA is refused on resume, not silently restarted
    ema.load_state_dict({})
    with pytest.raises(UserError, match="no EMA state for role.*student"):
        ema.load_shared_state_dict({"critic": {}})


def test_ema_resume_is_exact_and_exported(tmp_path, tiny_wan, tiny_teacher, latent_data):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = base_config("dmd2", tiny_wan, tiny_teacher, latent_data, straight)
    cfg["roles"]["student"]["ema"] = {"decay": 0.8, "use_warmup": True}
    cfg["training"].update(max_train_steps=6, checkpointing_steps=3)
    cfg["method_config"]["generator_update_interval"] = 2
    path = write_config(tmp_path / "run.yaml", cfg)
    assert run_cli("--config", str(path)).returncode == 0
    ckpt = straight / "checkpoints" / "checkpoint-3"
    proc = run_cli("--config", str(path), f"training.output_dir={resumed}", f"training.resume_from_checkpoint={ckpt}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    def ema_state(out):
        ckpt = out / "checkpoints" / "checkpoint-6"
        rank = torch.load(ckpt / "rank_state_0.pt", weights_only=False)["callbacks"]["ema"]
        assert rank == {}  # one process holds the whole shadow: saved once, in the shared file
        return torch.load(ckpt / "shared_state.pt", weights_only=False)["callbacks"]["ema"]

    a, b = ema_state(straight), ema_state(resumed)
    assert a["student"]["optimization_step"] == b["student"]["optimization_step"] == 3
    assert all(torch.equal(x, y) for x, y in zip(a["student"]["shadow"], b["student"]["shadow"]))
    # the export holds the averaged weights, not the raw ones
    exported = load_file(straight / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    raw = load_file(straight / "checkpoints" / "checkpoint-6" / "model.safetensors")
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(tiny_wan, subfolder="transformer")
    names = [n for n, _ in model.named_parameters()]  # the shadow's order (all parameters train)
    assert all(torch.equal(exported[n], s) for n, s in zip(names, a["student"]["shadow"]))
    assert any(not torch.equal(exported[n], raw[n]) for n in names)
    info = json.loads((straight / "export" / "accel_distill_export.json").read_text())
    assert info["ema"] is True
