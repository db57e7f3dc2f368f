"""DMD2 math on hand-built tensors, and its update schedule on a real (tiny) runtime."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import base_config, write_config

from accel_distill.builder import build_runtime
from accel_distill.config import load_config
from accel_distill.families.base import ModelAdapter
from accel_distill.methods.base import SampleNoise
from accel_distill.methods.dmd2 import dmd_gradient, dmd_pseudo_loss
from accel_distill.noise import RectifiedFlow
from accel_distill.roles import RoleHandle
from accel_distill.trainer import Trainer


def test_pseudo_loss_gradient_is_the_normalised_score_difference_and_reaches_only_x0():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 3, 3, generator=gen, requires_grad=True)
    # the scores keep their graph here: only the pseudo-loss's stop-gradient keeps them out
    fake, real = (t.requires_grad_() for t in torch.randn(2, 3, 4, 2, 3, 3, generator=gen))
    grad = dmd_gradient(x0.detach(), fake, real)
    assert grad.requires_grad
    g_x0, g_fake, g_real = torch.autograd.grad(dmd_pseudo_loss(x0, grad), [x0, fake, real], allow_unused=True)
    assert g_fake is None and g_real is None  # no gradient reaches the critic or the teacher
    for b in range(3):  # per sample, by hand: no hidden B == 1 assumption
        expected = (fake[b] - real[b]) / (x0[b] - real[b]).abs().mean()
        torch.testing.assert_close(g_x0[b] * x0.numel(), expected.detach(), rtol=1e-5, atol=1e-6)


def test_normalisation_is_per_sample():
    gen = torch.Generator().manual_seed(1)
    x0, fake, real = torch.randn(3, 3, 4, 1, 2, 2, generator=gen)
    far = x0.clone()
    far[1] = real[1] + 10 * (x0[1] - real[1])  # sample 1 far from the teacher
    a, b = dmd_gradient(x0, fake, real), dmd_gradient(far, fake, real)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[2], b[2])
    torch.testing.assert_close(b[1], a[1] / 10)


@pytest.mark.parametrize("critic_agrees", [True, False], ids=["0/0", "x/0"])
def test_a_sample_equal_to_the_teacher_gets_no_gradient_and_spares_the_others(critic_agrees):
    """Student == teacher is no correction for that sample (0/0 or, critic elsewhere, x/0), not a NaN or
    an inf (nan_to_num's 3e38) that overflows the whole batch's loss."""
    gen = torch.Generator().manual_seed(2)
    x0, fake, real = torch.randn(3, 3, 4, 1, 2, 2, generator=gen)
    x0[1] = real[1]
    if critic_agrees:
        fake[1] = real[1]
    grad = dmd_gradient(x0, fake, real)
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    for b in (0, 2):
        torch.testing.assert_close(grad[b], dmd_gradient(x0[b : b + 1], fake[b : b + 1], real[b : b + 1])[0])
        assert grad[b].abs().sum() > 0
    student = x0.clone().requires_grad_()
    loss = dmd_pseudo_loss(student, grad)
    loss.backward()
    assert math.isfinite(loss.item()) and loss > 0
    torch.testing.assert_close(student.grad, grad / grad.numel())


class ScaledByCondition(torch.nn.Module):
    """A stand-in transformer: v = x * mean(cond) + t / 1000, counting its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        self.calls += 1
        scale = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return (hidden_states * scale + timestep.view(-1, 1, 1, 1, 1) / 1000,)


class PlainAdapter(ModelAdapter):
    def _forward(self, module, dtype, x_t, t, cond):
        return module(hidden_states=x_t, timestep=t, encoder_hidden_states=cond["text"])[0]


def test_cfg_formula_and_single_pass_at_scale_one():
    model = ScaledByCondition()
    role = RoleHandle("teacher", {"transformer": model}, trainable=False, dtype=torch.float32)
    adapter = PlainAdapter(RectifiedFlow(3.0), latent_channels=4)
    x = torch.randn(2, 4, 1, 2, 2)
    t = torch.tensor([900.0, 300.0])
    cond, neg = {"text": torch.full((2, 5, 8), 2.0)}, {"text": torch.full((2, 5, 8), 0.5)}
    v_cond = x * 2.0 + t.view(-1, 1, 1, 1, 1) / 1000
    v_neg = x * 0.5 + t.view(-1, 1, 1, 1, 1) / 1000
    out = adapter.predict_cfg(role, x, t, cond, neg, guidance_scale=4.0)
    torch.testing.assert_close(out, v_neg + 4.0 * (v_cond - v_neg))
    assert model.calls == 1  # cond and negative halves in one batch
    x0 = adapter.predict_x0_cfg(role, x, t, cond, neg, 4.0)
    torch.testing.assert_close(x0, x - (t / 1000).view(-1, 1, 1, 1, 1) * (v_neg + 4.0 * (v_cond - v_neg)))
    torch.testing.assert_close(adapter.predict_cfg(role, x, t, cond, neg, 1.0), v_cond)
    assert model.calls == 3


def test_flow_conversions_round_trip():
    flow = RectifiedFlow(5.0)
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 3, 4, 1, 2, 2, generator=gen)
    t = torch.tensor([999.0, 10.0, 500.0])
    x_t = flow.add_noise(x0, noise, t)
    v = flow.target(x0, noise, t)
    torch.testing.assert_close(flow.to_x0(v, x_t, t), x0)
    torch.testing.assert_close(flow.to_noise(v, x_t, t), noise)
    torch.testing.assert_close(flow.from_x0(x0, x_t, t), v, rtol=1e-4, atol=1e-4)
    # shift as diffusers' flow-match schedulers apply it
    s = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(flow.shift_sigma(s), 5 * s / (1 + 4 * s))


# --- on a real runtime --------------------------------------------------------------------


@pytest.fixture
def runtime(tmp_path, tiny_wan, tiny_teacher, latent_data):
    def make(**method_config):
        cfg = base_config("dmd2", tiny_wan, tiny_teacher, latent_data, tmp_path / "out")
        cfg["method_config"].update(method_config)
        cfg["training"].update(lr_scheduler="linear", lr_warmup_steps=0, max_train_steps=9, train_batch_size=3)
        cfg["training"]["data_path"] = str(latent_data)
        return build_runtime(load_config(str(write_config(tmp_path / "run.yaml", cfg))))

    return make


def count_forwards(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_critic_trains_on_the_flow_of_the_detached_student_sample(runtime, monkeypatch):
    rt = runtime(rollout_mode="data")
    method, adapter = rt.method, rt.method.adapter
    batch = next(iter(rt.stream))
    cond, rng = adapter.conditioning(batch), method.sample_noise(batch)
    x0, _ = method.student_x0(batch, cond, rng, grad=True)
    assert x0.requires_grad  # the student's graph is live, as on a student-update iteration

    # a critic whose flow is exact for x0 (x_t = x0 + sigma v): the loss must vanish
    exact = lambda role, x_t, t, c: (x_t - x0.detach()) / adapter.noise.sigma(t, x_t)  # noqa: E731
    with monkeypatch.context() as m:
        m.setattr(adapter, "predict", exact)
        assert method.critic_loss(x0, cond, rng).item() < 1e-10

    loss = method.critic_loss(x0, cond, rng)
    assert loss.item() > 1e-4
    loss.backward()
    assert all(p.grad is None for p in rt.bundle["student"].transformer.parameters())  # sample detached
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in rt.bundle["critic"].transformer.parameters())


def test_score_timesteps_lie_in_the_shifted_bounds_per_sample(runtime):
    rt = runtime(min_timestep_ratio=0.3, max_timestep_ratio=0.6)
    keys = torch.stack([torch.zeros(4096, dtype=torch.int64), torch.arange(4096)], dim=1)
    t = rt.method.score_timesteps(SampleNoise(0, keys, torch.device("cpu")))
    shift = rt.adapter.noise.shift
    lo, hi = (1000 * shift * r / (1 + (shift - 1) * r) for r in (0.3, 0.6))
    assert lo - 1e-3 <= t.min() and t.max() <= hi + 1e-3
    assert t.unique().numel() > 4000  # one timestep per sample, not per batch


def test_optimizers_and_schedulers_step_together_with_interval_three(runtime):
    rt = runtime(generator_update_interval=3)
    trainer = Trainer(rt.accelerator, rt.method, iter(rt.stream), rt.method.cfg.training)
    student, critic = rt.bundle["student"], rt.bundle["critic"]
    history = []
    for it in range(7):
        before = student.transformer.proj_out.weight.detach().clone()
        trainer.step()
        changed = not torch.equal(before, student.transformer.proj_out.weight)
        history.append((it, changed, student.lr_scheduler.last_epoch, critic.lr_scheduler.last_epoch))
    # student updates at 0, 3, 6; its scheduler steps exactly then; the critic every iteration
    assert [h[1] for h in history] == [it % 3 == 0 for it in range(7)]
    assert [h[2] for h in history] == [1, 1, 1, 2, 2, 2, 3]
    assert [h[3] for h in history] == list(range(1, 8))
    adam_steps = {r: next(iter(rt.bundle[r].optimizer.state.values()))["step"].item() for r in ("student", "critic")}
    assert adam_steps == {"student": 3, "critic": 7}
    # linear decay over each role's own number of optimizer steps: ceil(9 / 3) = 3 and 9
    assert student.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)
    assert critic.lr_scheduler.get_last_lr()[0] == pytest.approx(2e-4 * (9 - 7) / 9)


def test_simulate_runs_only_the_steps_the_exit_index_needs(runtime):
    rt = runtime(rollout_mode="simulate", generator_update_interval=2)
    calls = count_forwards(rt.method.bundle["student"].transformer)
    batch = next(iter(rt.stream))
    exits = []
    for it in range(30):
        calls[0] = 0
        _, outputs = rt.method.train_step(batch, it)
        exits.append(outputs["exit_index"])
        # a single rollout: exit-index no-grad steps plus the graded one, also on
        # student-update iterations where the critic reuses the sample
        assert calls[0] == outputs["exit_index"] + 1
    assert set(exits) == {0, 1, 2}


def test_update_iteration_passes_and_batch_rows(runtime):
    rt = runtime(rollout_mode="data", real_score_guidance_scale=3.0)
    teacher = count_forwards(rt.method.bundle["teacher"].transformer)
    critic = count_forwards(rt.method.bundle["critic"].transformer)
    batch = next(iter(rt.stream))
    losses, outputs = rt.method.train_step(batch, 0)
    assert set(losses) == {"total_loss", "dmd_loss", "critic_loss"}
    assert teacher[0] == 1 and critic[0] == 2  # CFG batched; critic in DMD (no grad) + its own loss
    assert outputs["student_x0"].shape[0] == 3 and outputs["dmd_timesteps"].unique().numel() == 3
    losses["total_loss"].backward()
    assert all(p.grad is None for p in rt.bundle["teacher"].transformer.parameters())
    assert any(p.grad is not None for p in rt.bundle["student"].transformer.parameters())
    losses, _ = rt.method.train_step(batch, 1)
    assert set(losses) == {"total_loss", "critic_loss"}
    assert math.isfinite(losses["total_loss"].item())


def test_student_graph_is_backpropagated_before_the_critics_is_built(runtime):
    """Under the trainer's backward (backward_with), a student-update step backpropagates the student's
    pseudo-loss before the critic's graded forward: the two graphs' activations never coexist. Losses and
    gradients are bitwise those of one combined backward of total_loss (a direct train_step call)."""
    rt = runtime(rollout_mode="data")
    student, critic = rt.bundle["student"].transformer, rt.bundle["critic"].transformer
    batch = next(iter(rt.stream))

    def grads():
        out = {
            f"{role}.{n}": p.grad.clone()
            for role, m in (("s", student), ("c", critic))
            for n, p in m.named_parameters()
        }
        for m in (student, critic):
            m.zero_grad(set_to_none=True)
        return out

    combined, _ = rt.method.train_step(batch, 0)
    combined["total_loss"].backward()
    expected = grads()

    seen = []  # at each graded critic forward: had the student's gradients arrived?
    critic.register_forward_pre_hook(
        lambda *_: (
            seen.append(all(p.grad is not None for p in student.parameters())) if torch.is_grad_enabled() else None
        )
    )
    with rt.method.backward_with(lambda loss: loss.backward()):
        staged, _ = rt.method.train_step(batch, 0)
    assert seen == [True]
    assert all(p.grad is None for p in critic.parameters())  # the critic's part is total_loss's backward
    staged["total_loss"].backward()
    assert all(torch.equal(staged[k], combined[k]) for k in combined)
    got = grads()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_sample_noise_depends_on_the_sample_not_the_batch_layout():
    keys = torch.tensor([[0, 5], [0, 9], [1, 5]])
    whole = SampleNoise(7, keys, torch.device("cpu"))
    halves = [SampleNoise(7, keys[:2], torch.device("cpu")), SampleNoise(7, keys[2:], torch.device("cpu"))]
    a = (whole.randn((2, 3)), whole.rand(), whole.randint(4))
    b = [(h.randn((2, 3)), h.rand(), h.randint(4)) for h in halves]
    for i in range(3):
        assert torch.equal(a[i], torch.cat([b[0][i], b[1][i]]))
    assert not torch.equal(a[0][0], a[0][2])  # the same row in another epoch draws anew
