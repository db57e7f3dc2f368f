"""Callbacks: training-side extras (EMA, validation, ...) around the loop, with checkpointed state.

The trainer calls every callback at the same points and saves their
``state_dict`` in each checkpoint (per rank), so a resumed run continues an
EMA or a validation schedule exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accel_distill.trainer.loop import Trainer


class Callback:
    """Base class: override what you need. ``name`` keys the state in checkpoints."""

    name: str = "callback"

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first iteration of this process (also after a resume)."""

    def on_step_end(self, trainer: Trainer, iteration: int, stepped: list[str]) -> dict[str, float]:
        """After iteration ``iteration``; ``stepped`` names the optimizers that stepped (empty when skipped).

        Returns metrics to log (may be empty).
        """
        return {}

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last iteration, before export."""

    def state_dict(self) -> dict:
        """This process's state, saved in its own per-rank file."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    def shared_state_dict(self) -> dict:
        """State identical on every rank: the main process saves it once, every rank loads it."""
        return {}

    def load_shared_state_dict(self, state: dict) -> None:
        """Restore what :meth:`shared_state_dict` returned (called after :meth:`load_state_dict`)."""
