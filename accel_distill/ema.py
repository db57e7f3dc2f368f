"""EMA of trainable roles: diffusers' ``EMAModel`` as a callback, fp32, stepped with the role's optimizer.

The shadow is updated only on iterations where that role's optimizer stepped
(a DMD2 student every ``generator_update_interval``), is kept in float32 even
for bf16 weights (a 1e-4 lerp rounds away in bf16), lives next to the
parameters (sharded like them under FSDP), and is saved in every checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.training_utils import EMAModel

from accel_distill.config.schema import EMASpec
from accel_distill.roles import ModelBundle
from accel_distill.trainer.callbacks import Callback


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class EMACallback(Callback):
    """One ``EMAModel`` per role with an ``ema`` spec."""

    name = "ema"

    def __init__(self, bundle: ModelBundle, specs: dict[str, EMASpec]):
        self.bundle, self.specs = bundle, specs
        self.emas: dict[str, EMAModel] = {}
        for role, spec in specs.items():
            params = self.parameters(role)
            ema = EMAModel(
                params,
                decay=spec.decay,
                min_decay=spec.min_decay,
                update_after_step=spec.update_after_step,
                use_ema_warmup=spec.use_warmup,
                inv_gamma=spec.inv_gamma,
                power=spec.power,
            )
            ema.shadow_params = [p.detach().float().clone() for p in params]
            self.emas[role] = ema

    def parameters(self, role: str) -> list[torch.nn.Parameter]:
        """The parameters that train (all, or a LoRA adapter's), in a fixed order."""
        return [p for p in self.bundle[role].transformer.parameters() if p.requires_grad]

    def on_step_end(self, trainer, iteration: int, stepped: list[str]) -> dict[str, float]:
        metrics = {}
        for role in stepped:
            if role in self.emas:
                self.emas[role].step(self.parameters(role))
                metrics[f"ema_decay/{role}"] = float(self.emas[role].cur_decay_value or 0.0)
        return metrics

    @contextlib.contextmanager
    def averaged(self, role: str) -> Iterator[None]:
        """Temporarily swap the role's weights for the averaged ones (validation, export)."""
        ema, params = self.emas[role], self.parameters(role)
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, ema.shadow_params):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {
            role: {"optimization_step": ema.optimization_step, "shadow": [_local(s).cpu() for s in ema.shadow_params]}
            for role, ema in self.emas.items()
        }

    def load_state_dict(self, state: dict) -> None:
        for role, ema in self.emas.items():
            ema.optimization_step = state[role]["optimization_step"]
            with torch.no_grad():
                for s, saved in zip(ema.shadow_params, state[role]["shadow"]):
                    _local(s).copy_(saved)
