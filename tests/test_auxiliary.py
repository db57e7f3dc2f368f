"""A method's own trainable network (a discriminator head, an EMA target ...): prepared, clipped,
stepped, checkpointed and resumed by the runner and trainer, which never learn its name."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from conftest import base_config, metrics_by_iteration, write_config

from accel_distill.config import load_config
from accel_distill.methods.finetune import FinetuneConfig, FinetuneMethod
from accel_distill.registry import register_method
from accel_distill.run import train


@dataclass
class ProbeConfig(FinetuneConfig):
    probe_weight: float = 0.1


@register_method("finetune_with_probe")
class FinetuneWithProbe(FinetuneMethod):
    """Finetune plus a method-owned linear head that learns each sample's mean latent from its text."""

    config_class = ProbeConfig

    @classmethod
    def auxiliary_names(cls, cfg):
        return ("probe",)

    def build_auxiliary(self):
        torch.manual_seed(0)
        return {"probe": torch.nn.Linear(self.neg_cond.shape[-1] if self.neg_cond is not None else 32, 1)}

    def train_step(self, batch, iteration):
        losses, outputs = super().train_step(batch, iteration)
        probe = self.bundle["probe"].modules["probe"]
        target = self.adapter.normalize_latents(batch["latents"]).mean(dim=(1, 2, 3, 4))
        pred = probe(batch["text_embeds"].float().mean(dim=1)).squeeze(-1)
        probe_loss = F.mse_loss(pred, target)
        losses["probe_loss"] = probe_loss.detach()
        losses["total_loss"] = losses["total_loss"] + self.config.probe_weight * probe_loss
        return losses, outputs


def test_method_owned_network_trains_checkpoints_and_resumes_exactly(tmp_path, tiny_wan, tiny_teacher, latent_data):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = base_config("finetune", tiny_wan, tiny_teacher, latent_data, straight)
    cfg["recipe"]["method"] = "finetune_with_probe"
    cfg["training"].update(max_train_steps=4, checkpointing_steps=2, learning_rate=1e-2)
    path = write_config(tmp_path / "run.yaml", cfg)
    train(load_config(str(path)))
    ckpt = straight / "checkpoints" / "checkpoint-2"
    assert json.loads((ckpt / "roles.json").read_text())["models"] == ["student", "probe"]
    train(load_config(str(path), [f"training.output_dir={resumed}", f"training.resume_from_checkpoint={ckpt}"]))

    a, b = metrics_by_iteration(straight), metrics_by_iteration(resumed)
    assert {"grad_norm/probe", "lr/probe", "probe_loss"} <= set(a[4])  # clipped, scheduled, logged
    keys = ("total_loss", "probe_loss", "grad_norm/probe", "grad_norm/student")
    assert {i: [a[i][k] for k in keys] for i in (3, 4)} == {i: [b[i][k] for k in keys] for i in (3, 4)}
    from safetensors.torch import load_file

    last = [load_file(out / "checkpoints" / "checkpoint-4" / "model_1.safetensors") for out in (straight, resumed)]
    assert last[0].keys() == {"weight", "bias"} and all(torch.equal(last[0][k], last[1][k]) for k in last[0])
    at_2 = load_file(ckpt / "model_1.safetensors")
    assert not torch.equal(at_2["weight"], last[0]["weight"])  # the head trains
