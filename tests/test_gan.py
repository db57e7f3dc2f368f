"""DMD2's GAN head: its losses on hand-built tensors, the teacher feature tap, the update schedule,
exact resume and the bad-input errors. (2 processes, DDP and FSDP2: tests/test_distributed.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_config, write_config
from safetensors.torch import load_file

from accel_distill.builder import build_runtime
from accel_distill.config import load_config
from accel_distill.discriminator import FeatureDiscriminator, approximate_r1, discriminator_loss, generator_loss
from accel_distill.errors import ConfigError
from accel_distill.run import train
from accel_distill.trainer import Trainer


def test_non_saturating_losses_have_the_textbook_gradients():
    fake = torch.tensor([[-2.0, 0.5], [1.0, 3.0]], requires_grad=True)
    real = torch.tensor([[0.3, -1.0], [2.0, -0.2]], requires_grad=True)
    (g_fake,) = torch.autograd.grad(generator_loss(fake), [fake])
    # d/dx mean(softplus(-x)) = -sigmoid(-x) / n
    torch.testing.assert_close(g_fake, -torch.sigmoid(-fake.detach()) / 4)
    d_real, d_fake = torch.autograd.grad(discriminator_loss(real, fake), [real, fake])
    torch.testing.assert_close(d_fake, torch.sigmoid(fake.detach()) / 4)
    torch.testing.assert_close(d_real, -torch.sigmoid(-real.detach()) / 4)
    value = discriminator_loss(real, fake)
    expected = torch.nn.functional.softplus(fake).mean() + torch.nn.functional.softplus(-real).mean()
    torch.testing.assert_close(value, expected)
    # approximate R1: the squared change of D's output, gradient into both evaluations
    perturbed = real.detach() + 0.5
    r1 = approximate_r1(real, perturbed.requires_grad_())
    torch.testing.assert_close(r1, torch.tensor(0.25))
    assert torch.autograd.grad(r1, [real])[0].abs().sum() > 0


def test_discriminator_heads_average_their_tokens():
    torch.manual_seed(0)
    d = FeatureDiscriminator(width=6, num_blocks=2, hidden=8)
    feats = [torch.randn(3, 5, 6), torch.randn(3, 7, 6)]
    logits = d(feats)
    assert logits.shape == (3, 2)
    torch.testing.assert_close(logits[:, 1], d.heads[1](feats[1]).squeeze(-1).mean(dim=1))
    # sample 0's logit does not depend on sample 1's tokens
    other = [f.clone() for f in feats]
    other[0][1] += 10
    torch.testing.assert_close(d(other)[0], logits[0])
    with pytest.raises(ValueError, match="1 feature maps for 2 heads"):
        d(feats[:1])


@pytest.fixture
def runtime(tmp_path, tiny_wan, tiny_teacher, latent_data):
    def make(**method_config):
        cfg = base_config("dmd2", tiny_wan, tiny_teacher, latent_data, tmp_path / "out")
        cfg["method_config"].update(gan_feature_blocks=[1, 0], gan_generator_weight=0.5, **method_config)
        cfg["training"].update(lr_scheduler="linear", max_train_steps=6, train_batch_size=2)
        return build_runtime(load_config(str(write_config(tmp_path / "run.yaml", cfg))))

    return make


def grads(module: torch.nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_feature_tap_returns_the_blocks_hidden_states_with_gradient_to_the_input(runtime):
    rt = runtime()
    teacher, adapter = rt.bundle["teacher"], rt.adapter
    batch = next(iter(rt.stream))
    cond = adapter.conditioning(batch)
    x = adapter.normalize_latents(batch["latents"]).requires_grad_()
    t = torch.tensor([700.0, 200.0])
    seen = {}
    hooks = [
        blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.detach().float()))
        for i, blk in enumerate(teacher.transformer.blocks)
    ]
    feats = adapter.features(teacher, x, t, cond, [1, 0])
    for h in hooks:
        h.remove()
    width = adapter.feature_width(teacher.transformer)
    tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
    assert [f.shape for f in feats] == [(2, tokens, width)] * 2
    torch.testing.assert_close(feats[0].detach(), seen[1])  # in the requested order
    torch.testing.assert_close(feats[1].detach(), seen[0])
    feats[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.transformer.parameters())  # frozen teacher
    assert all(not blk._forward_hooks for blk in teacher.transformer.blocks)  # taps removed


def test_gradients_reach_the_student_from_the_generator_term_and_only_the_head_from_its_loss(runtime):
    rt = runtime(generator_update_interval=2, gan_r1_weight=1.0)
    method, bundle = rt.method, rt.bundle
    disc = bundle["discriminator"].modules["discriminator"]
    batch = next(iter(rt.stream))

    losses, _ = method.train_step(batch, 1)  # critic-only iteration: critic + discriminator
    assert {"gan_discriminator_loss", "gan_r1"} <= set(losses) and "gan_generator_loss" not in losses
    losses["total_loss"].backward()
    assert grads(disc) and grads(bundle["critic"].transformer)
    assert not grads(bundle["student"].transformer) and not grads(bundle["teacher"].transformer)
    method.optimizers_zero_grad(1)

    # student iteration: the generator term alone carries the GAN gradient into the student
    cond, rng = rt.adapter.conditioning(batch), method.sample_noise(batch)
    x0, _ = method.student_x0(batch, cond, rng, grad=True)
    gen = method.gan.generator_loss(x0, cond, torch.tensor([500.0, 500.0]), torch.randn_like(x0))
    gen.backward()
    assert grads(bundle["student"].transformer) and not grads(bundle["teacher"].transformer)
    losses, _ = method.train_step(batch, 0)
    assert "gan_generator_loss" in losses and "gan_discriminator_loss" not in losses


def test_the_discriminator_steps_on_the_critic_only_iterations_with_its_own_schedule(runtime):
    rt = runtime(generator_update_interval=3)
    trainer = Trainer(rt.accelerator, rt.method, iter(rt.stream), rt.method.cfg.training)
    disc = rt.bundle["discriminator"]
    head = disc.modules["discriminator"].heads[0][1].weight
    changed = []
    for _ in range(6):
        before = head.detach().clone()
        trainer.step()
        changed.append(not torch.equal(before, head))
    assert changed == [False, True, True, False, True, True]  # student at 0 and 3
    assert disc.lr_scheduler.last_epoch == 4
    assert next(iter(disc.optimizer.state.values()))["step"].item() == 4
    # linear decay over its own 6 - ceil(6 / 3) = 4 steps, at the critic's learning rate
    assert disc.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)
    assert disc.optimizer.param_groups[0]["betas"] == (0.0, 0.99)  # the critic's betas


def test_gan_dmd2_resumes_bitwise(tmp_path, tiny_wan, tiny_teacher, latent_data):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = base_config("dmd2", tiny_wan, tiny_teacher, latent_data, straight)
    cfg["method_config"].update(gan_feature_blocks=[0, 1], gan_generator_weight=0.5, gan_r1_weight=0.5)
    cfg["training"].update(max_train_steps=4, checkpointing_steps=2, lr_scheduler="cosine")
    path = write_config(tmp_path / "run.yaml", cfg)
    train(load_config(str(path)))
    ckpt = straight / "checkpoints" / "checkpoint-2"
    assert json.loads((ckpt / "roles.json").read_text())["models"] == ["student", "critic", "discriminator"]
    train(load_config(str(path), [f"training.output_dir={resumed}", f"training.resume_from_checkpoint={ckpt}"]))

    def rows(out):
        lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
        return {r["iteration"]: {k: v for k, v in r.items() if k != "step_time"} for r in map(json.loads, lines)}

    a, b = rows(straight), rows(resumed)
    assert sorted(b) == [3, 4] and {i: a[i] for i in b} == b
    assert "gan_generator_loss" in a[3] and "grad_norm/discriminator" in a[4]
    last = [load_file(out / "checkpoints" / "checkpoint-4" / "model_2.safetensors") for out in (straight, resumed)]
    assert all(torch.equal(last[0][k], last[1][k]) for k in last[0])
    first = load_file(ckpt / "model_2.safetensors")
    assert any(not torch.equal(first[k], last[0][k]) for k in first)  # the head trains


def gan_config(tmp_path, tiny_wan, tiny_teacher, data, **method_config) -> str:
    cfg = base_config("dmd2", tiny_wan, tiny_teacher, data, tmp_path / "out")
    cfg["method_config"].update({"gan_feature_blocks": [0, 1], **method_config})
    return str(write_config(tmp_path / "run.yaml", cfg))


def test_bad_gan_settings_are_one_line_naming_the_key(tmp_path, tiny_wan, tiny_teacher, latent_data, text_data):
    with pytest.raises(ConfigError) as e:
        load_config(gan_config(tmp_path, tiny_wan, tiny_teacher, latent_data, gan_feature_blocks=[0, 2]))
    assert str(e.value).endswith(
        "method_config.gan_feature_blocks: block 2 is out of range: the teacher has 2 blocks (0..1)"
    )
    with pytest.raises(ConfigError, match="gan_feature_blocks: the discriminator trains on the critic-only"):
        load_config(gan_config(tmp_path, tiny_wan, tiny_teacher, latent_data, generator_update_interval=1))
    # a data-free rollout has no real samples for the discriminator: refused at config time, with the reason
    with pytest.raises(ConfigError) as e:
        load_config(gan_config(tmp_path, tiny_wan, tiny_teacher, text_data, rollout_mode="simulate"))
    assert f"gan_feature_blocks: the GAN head's real samples are data latents, but {text_data} holds text only" in (
        str(e.value)
    )
    assert "a data-free (simulate) rollout has no real samples" in str(e.value)
