"""Consistency distillation: its loss and targets on hand-built tensors, the EMA target's schedule,
and train -> exact resume -> export -> stock WanPipeline sampling on the tiny Wan."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_config, write_config
from safetensors.torch import load_file
from stock_sampling import assert_stock_wan_samples

from accel_distill.builder import build_runtime
from accel_distill.config import load_config
from accel_distill.errors import ConfigError
from accel_distill.methods.consistency import TARGET, consistency_loss, continuous_consistency_loss, timestep_grid
from accel_distill.noise import RectifiedFlow
from accel_distill.run import build_callbacks, train
from accel_distill.schedule import fit_few_step_schedule


def cd_config(tmp_path, tiny_wan, tiny_teacher, data, out, **method_config) -> dict:
    cfg = base_config("finetune", tiny_wan, tiny_teacher, data, out)
    cfg["recipe"]["method"] = "consistency"
    cfg["roles"]["teacher"] = {"path": str(tiny_teacher), "trainable": False}
    cfg["method_config"] = {"num_discretization_steps": 8, "guidance_scale": 3.0, "target_ema_start": 1}
    cfg["method_config"].update({"target_ema_decay": 0.5, **method_config})
    cfg["training"].update(learning_rate=1e-3)
    return cfg


@pytest.mark.parametrize("kind", ["l2", "huber"])
def test_loss_gradient_reaches_the_student_only(kind):
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 1, 2, 2, generator=gen, requires_grad=True)
    target = torch.randn(2, 3, 1, 2, 2, generator=gen, requires_grad=True)  # a live graph, cut by the loss
    loss = consistency_loss(pred, target, kind, c=0.1)
    g_pred, g_target = torch.autograd.grad(loss, [pred, target], allow_unused=True)
    assert g_target is None
    d = (pred - target).detach()
    expected = 2 * d / d.numel() if kind == "l2" else d / ((d**2 + 0.01).sqrt() * d.numel())
    torch.testing.assert_close(g_pred, expected)


def test_continuous_loss_pushes_along_the_normalised_tangent():
    gen = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 3, 1, 2, 2, generator=gen, requires_grad=True)
    tangent = torch.randn(2, 3, 1, 2, 2, generator=gen, requires_grad=True)
    tangent_scaled = tangent.detach().clone()
    tangent_scaled[1] *= 100  # per-sample normalisation: a sample's scale does not change its push
    g1, g_t = torch.autograd.grad(continuous_consistency_loss(pred, tangent, c=0.0), [pred, tangent], allow_unused=True)
    assert g_t is None
    (g2,) = torch.autograd.grad(continuous_consistency_loss(pred, tangent_scaled, c=0.0), [pred])
    rms = tangent.detach().pow(2).mean(dim=(1, 2, 3, 4), keepdim=True).sqrt()
    torch.testing.assert_close(g1, tangent.detach() / rms / pred.numel())
    torch.testing.assert_close(g2, g1)


def test_grid_spans_clean_to_pure_noise_in_the_shifted_time():
    flow = RectifiedFlow(3.0)
    grid = timestep_grid(flow, 4, torch.device("cpu"))
    s = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    torch.testing.assert_close(grid, 1000 * 3 * s / (1 + 2 * s))
    assert grid[0] == 0 and grid[-1] == 1000


@pytest.fixture
def runtime(tmp_path, tiny_wan, tiny_teacher, latent_data):
    cfg = cd_config(tmp_path, tiny_wan, tiny_teacher, latent_data, tmp_path / "out")
    rt = build_runtime(load_config(str(write_config(tmp_path / "run.yaml", cfg))))
    build_callbacks(rt.method.cfg, rt)
    return rt


def test_teacher_takes_one_cfg_euler_step_and_the_boundary_target_is_its_result(runtime, monkeypatch):
    method, adapter = runtime.method, runtime.adapter
    batch = next(iter(runtime.stream))
    cond = adapter.conditioning(batch)
    x = torch.randn(2, 16, 2, 4, 4)
    t, t_prev = method.grid[[3, 1]], method.grid[[2, 0]]
    with torch.no_grad():
        v = adapter.predict_cfg(runtime.bundle["teacher"], x, t, cond, method.negative(cond), 3.0)
        x_hat = method.teacher_step(x, t, t_prev, cond)
        sig = lambda s: (s / 1000).view(-1, 1, 1, 1, 1)  # noqa: E731
        torch.testing.assert_close(x_hat, x + (sig(t_prev) - sig(t)) * v)  # Euler, sigma_{n-1} - sigma_n
        target = method.target_x0(x_hat, t_prev, cond)
    torch.testing.assert_close(target[1], x_hat[1])  # t_0 = 0: f(x, 0) = x
    # away from the boundary: the target network's x0 (here the EMA, equal to the student at the start)
    with torch.no_grad():
        student_x0 = adapter.predict_x0(runtime.bundle["student"], x_hat, t_prev, cond)
    torch.testing.assert_close(target[0], student_x0[0])


def test_target_swaps_in_the_ema_and_restores_the_student(runtime):
    method, student = runtime.method, runtime.bundle["student"].transformer
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    ema = method.target.emas["student"]
    with torch.no_grad():
        for s in ema.shadow_params:
            s.add_(0.1)  # a target different from the student
    batch = next(iter(runtime.stream))
    cond = runtime.adapter.conditioning(batch)
    x, t = torch.randn(2, 16, 2, 4, 4), method.grid[[5, 6]]
    with torch.no_grad():
        target = method.target_x0(x, t, cond)
        online = runtime.adapter.predict_x0(runtime.bundle["student"], x, t, cond)
    assert not torch.allclose(target, online)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    losses, _ = method.train_step(batch, 0)
    losses["total_loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in runtime.bundle["teacher"].transformer.parameters())


def test_train_resume_export_and_stock_pipeline_sampling(tmp_path, tiny_wan, tiny_teacher, latent_data):
    """4 iterations straight == 2 + resume + 2 (student, optimizer and the target EMA); the export is a
    3-step student that stock WanPipeline samples at the trained timesteps, equal to our sampler."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = cd_config(tmp_path, tiny_wan, tiny_teacher, latent_data, straight)
    cfg["training"].update(max_train_steps=4, checkpointing_steps=2, lr_scheduler="cosine")
    path = write_config(tmp_path / "run.yaml", cfg)
    train(load_config(str(path)))
    ckpt = straight / "checkpoints" / "checkpoint-2"
    train(load_config(str(path), [f"training.output_dir={resumed}", f"training.resume_from_checkpoint={ckpt}"]))

    def rows(out):
        lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
        return {r["iteration"]: {k: v for k, v in r.items() if k != "step_time"} for r in map(json.loads, lines)}

    a, b = rows(straight), rows(resumed)
    assert sorted(b) == [3, 4] and {i: a[i] for i in b} == b
    assert [a[i][f"{TARGET}_decay/student"] for i in (1, 2, 3, 4)] == [0.0, 0.0, 0.5, 0.5]  # constant once started
    shadows = [
        torch.load(out / "checkpoints" / "checkpoint-4" / "shared_state.pt", weights_only=False)["callbacks"][TARGET]
        for out in (straight, resumed)
    ]
    assert shadows[0]["student"]["optimization_step"] == 4
    assert all(torch.equal(x, y) for x, y in zip(shadows[0]["student"]["shadow"], shadows[1]["student"]["shadow"]))
    exported = load_file(straight / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    again = load_file(resumed / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], again[k]) for k in exported)
    info = json.loads((straight / "export" / "accel_distill_export.json").read_text())
    assert info["method"] == "consistency" and info["scheduler"]["class"] == "FlowMatchLCMScheduler"

    assert_stock_wan_samples(straight / "export", fit_few_step_schedule([1000, 757, 522], kind="sde"))


def test_continuous_tangent_forward_ad_matches_finite_differences(tmp_path, tiny_wan, tiny_teacher, latent_data):
    """torch.func.jvp through diffusers' Wan attention works with the _native_math backend; central
    finite differences (any backend) agree with it."""
    cfg = cd_config(
        tmp_path, tiny_wan, tiny_teacher, latent_data, tmp_path / "out", time="continuous", jvp="forward_ad"
    )
    cfg["roles"]["student"]["attention_backend"] = "_native_math"
    rt = build_runtime(load_config(str(write_config(tmp_path / "run.yaml", cfg))))
    method = rt.method
    assert method.build_callbacks() == []  # no EMA target in continuous time
    batch = next(iter(rt.stream))
    cond = rt.adapter.conditioning(batch)
    x, t = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3)), torch.tensor([800.0, 300.0])
    with torch.no_grad():
        exact = method.tangent(x, t, cond)
        method.config.jvp = "finite_difference"
        method.config.fd_epsilon = 1e-4  # 0.1 timestep: the tiny model's time embedding turns within a few units
        approx = method.tangent(x, t, cond)
    assert exact.abs().mean() > 1e-4
    torch.testing.assert_close(approx, exact, rtol=1e-2, atol=1e-3)
    losses, outputs = method.train_step(batch, 0)
    losses["total_loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in rt.bundle["student"].transformer.parameters())
    assert all(p.grad is None for p in rt.bundle["teacher"].transformer.parameters())


def test_bad_consistency_settings_name_the_key(tmp_path, tiny_wan, tiny_teacher, latent_data):
    cfg = cd_config(
        tmp_path, tiny_wan, tiny_teacher, latent_data, tmp_path / "out", time="continuous", jvp="forward_ad"
    )
    with pytest.raises(ConfigError, match="method_config.jvp: forward_ad needs roles.student.attention_backend"):
        load_config(str(write_config(tmp_path / "c.yaml", cfg)))
    cfg = cd_config(tmp_path, tiny_wan, tiny_teacher, latent_data, tmp_path / "out", target_ema_decay=1.5)
    with pytest.raises(ConfigError, match=r"method_config.target_ema_decay: must be in \[0.0, 1.0\], got 1.5"):
        load_config(str(write_config(tmp_path / "a.yaml", cfg)))
    cfg = cd_config(tmp_path, tiny_wan, tiny_teacher, latent_data, tmp_path / "out")
    del cfg["roles"]["teacher"]
    with pytest.raises(ConfigError, match="roles.teacher: missing role"):
        load_config(str(write_config(tmp_path / "b.yaml", cfg)))


def test_two_fsdp_processes_shard_the_target_and_match_one(tmp_path, tiny_wan, tiny_teacher, latent_data):
    """FSDP2 on 2 CPU processes x batch 1 == 1 process x batch 2; the target EMA is sharded like the student."""
    from launching import backend_launch, launch

    runs = {}
    for name, batch in (("two", 1), ("one", 2)):
        cfg = cd_config(tmp_path, tiny_wan, tiny_teacher, latent_data, tmp_path / name)
        cfg["training"].update(max_train_steps=3, checkpointing_steps=3, train_batch_size=batch)
        path = write_config(tmp_path / f"{name}.yaml", cfg)
        if name == "two":
            launch(*backend_launch("fsdp"), "--config", str(path))
        else:
            train(load_config(str(path)))
        lines = (tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()
        runs[name] = {r["iteration"]: r["total_loss"] for r in map(json.loads, lines)}
    assert runs["two"] == pytest.approx(runs["one"], rel=1e-5)
    ckpt = tmp_path / "two" / "checkpoints" / "checkpoint-3"
    shards = [torch.load(ckpt / f"rank_state_{r}.pt", weights_only=False)["callbacks"][TARGET] for r in (0, 1)]
    assert [s["student"]["optimization_step"] for s in shards] == [3, 3]
    assert not torch.equal(shards[0]["student"]["shadow"][0], shards[1]["student"]["shadow"][0])
    assert (tmp_path / "two" / "export" / "transformer").is_dir()
