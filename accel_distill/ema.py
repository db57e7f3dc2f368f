"""EMA of trainable roles: diffusers' ``EMAModel`` as a callback, fp32, stepped with the role's optimizer.

The shadow is updated only on iterations where that role's optimizer stepped
(a DMD2 student every ``generator_update_interval``), is kept in float32 even
for bf16 weights (a 1e-4 lerp rounds away in bf16), lives next to the
parameters (sharded like them under FSDP), and is saved in every checkpoint: per rank
when sharded, once (by the main process) when every rank holds the same copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.training_utils import EMAModel

from accel_distill.config.schema import EMASpec
from accel_distill.errors import UserError
from accel_distill.roles import ModelBundle
from accel_distill.trainer.callbacks import Callback


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class EMACallback(Callback):
    """One ``EMAModel`` per trainable module of each role with an ``ema`` spec, keyed by unit name
    (the role, or ``role.module`` for a role with several modules)."""

    name = "ema"

    def __init__(self, bundle: ModelBundle, specs: dict[str, EMASpec], *, name: str = "ema"):
        self.name = name  # its checkpoint key: a method's own EMA (a consistency target) has another
        self.bundle, self.specs = bundle, specs
        self.emas: dict[str, EMAModel] = {}
        self.role_units: dict[str, list[str]] = {}
        self._params: dict[str, torch.nn.Module] = {}
        for role, spec in specs.items():
            self.role_units[role] = []
            for unit, module, _, _ in bundle[role].units():
                self._params[unit] = module
                self.role_units[role].append(unit)
                params = self.parameters(unit)
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
                self.emas[unit] = ema
        self._restored: set[str] = set()  # units a resume has restored

    def parameters(self, unit: str) -> list[torch.nn.Parameter]:
        """The parameters that train (all, or a LoRA adapter's), in a fixed order."""
        return [p for p in self._params[unit].parameters() if p.requires_grad]

    def on_step_end(self, trainer, iteration: int, stepped: list[str]) -> dict[str, float]:
        metrics = {}
        for unit in stepped:
            if unit in self.emas:
                self.emas[unit].step(self.parameters(unit))
                metrics[f"{self.name}_decay/{unit}"] = float(self.emas[unit].cur_decay_value or 0.0)
        return metrics

    @contextlib.contextmanager
    def averaged(self, role: str) -> Iterator[None]:
        """Temporarily swap every module of the role for its averaged weights (validation, export)."""
        pairs = [
            (p, s)
            for unit in self.role_units[role]
            for p, s in zip(self.parameters(unit), self.emas[unit].shadow_params)
        ]
        backup = [p.detach().clone() for p, _ in pairs]
        with torch.no_grad():
            for p, s in pairs:
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), b in zip(pairs, backup):
                    p.copy_(b)

    def replicated(self, unit: str) -> bool:
        """Every rank holds the unit's whole shadow (no FSDP sharding): it is checkpointed once, not per rank."""
        return not any(hasattr(s, "to_local") for s in self.emas[unit].shadow_params)

    def _state(self, roles: list[str]) -> dict:
        return {
            role: {
                "optimization_step": self.emas[role].optimization_step,
                "shadow": [_local(s).cpu() for s in self.emas[role].shadow_params],
            }
            for role in roles
        }

    def state_dict(self) -> dict:
        """Sharded (FSDP) roles: this rank's shard of the shadow."""
        return self._state([r for r in self.emas if not self.replicated(r)])

    def shared_state_dict(self) -> dict:
        """Replicated (DDP / single-process) roles: the whole shadow, saved once."""
        return self._state([r for r in self.emas if self.replicated(r)])

    def load_state_dict(self, state: dict) -> None:
        self._restored = set()
        self._load(state)

    def load_shared_state_dict(self, state: dict) -> None:
        self._load(state)
        missing = sorted(set(self.emas) - self._restored)
        if missing:
            raise UserError(
                f"the checkpoint holds no EMA state for role(s) {', '.join(missing)}; resume with the same roles"
            )

    def _load(self, state: dict) -> None:
        for role, saved in state.items():
            if role not in self.emas:
                continue
            ema = self.emas[role]
            ema.optimization_step = saved["optimization_step"]
            with torch.no_grad():
                for s, value in zip(ema.shadow_params, saved["shadow"], strict=True):
                    _local(s).copy_(value)
            self._restored.add(role)
