"""The algorithm-agnostic training loop.

It knows the method contract and accelerate, nothing about roles or
algorithms: it owns gradient accumulation (no gradient sync on non-final
micro-batches, loss / G, one optimizer step), per-module grad clipping, the
non-finite guard, progress, logging and checkpoint cadence.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from accel_distill.config.schema import TrainingConfig
from accel_distill.context_parallel import scale_partial_gradients
from accel_distill.data.finite import describe_nonfinite, finite_probes
from accel_distill.errors import DataError, UserError
from accel_distill.methods.base import DistillMethod
from accel_distill.trainer.callbacks import Callback

logger = get_logger(__name__)


class TrainingDiverged(UserError):
    """Too many consecutive iterations with a non-finite loss or gradient."""


@dataclass
class TrainerState:
    """Counters that are part of a checkpoint."""

    iteration: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0


def move_to(batch: dict, device: torch.device) -> dict:
    """Tensors to ``device`` (asynchronous from pinned batches); lists and strings stay on the host."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# Below this loss scale a run of fp16 overflows is divergence, not the scaler finding its range.
MIN_LOSS_SCALE = 1.0


class Trainer:
    """Runs ``method`` for ``cfg.max_train_steps`` iterations over ``batches``."""

    def __init__(
        self,
        accelerator: Accelerator,
        method: DistillMethod,
        batches: Iterator[dict],
        cfg: TrainingConfig,
        *,
        state: TrainerState | None = None,
        save_checkpoint: Callable[[TrainerState], None] | None = None,
        metrics_file: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
    ):
        self.acc, self.method, self.batches, self.cfg = accelerator, method, batches, cfg
        self.state = state or TrainerState()
        self.save_checkpoint = save_checkpoint
        self.callbacks = list(callbacks)
        # Callback metrics are host floats (never tensors: they would live on the wrong device);
        # they wait here for the next logged iteration.
        self.pending_extras: dict[str, float] = {}
        # Every logged step also lands here as one JSON line (main process), whatever the trackers.
        self.metrics_file = Path(metrics_file) if metrics_file is not None else None
        if self.metrics_file is not None and self.acc.is_main_process:
            self._truncate_metrics()
        # each clipped module's trainable parameters, listed once: a prepared module's parameters do not
        # change, and walking named_parameters() every iteration costs ~150 us per module even at 26k
        # parameters (a LoRA student over a 14B base would walk every frozen tensor for its few adapters)
        self._clip_params: dict[int, list[torch.nn.Parameter]] = {}

    def _truncate_metrics(self) -> None:
        """Keep only lines up to the iteration we start from: a resumed run continues the log."""
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
        lines = self.metrics_file.read_text().splitlines() if self.metrics_file.exists() else []
        kept = [line for line in lines if json.loads(line)["iteration"] <= self.state.iteration]
        self.metrics_file.write_text("".join(line + "\n" for line in kept))

    # --- pieces -------------------------------------------------------------------------
    def _no_sync(self, sync: bool) -> contextlib.ExitStack:
        """Skip DDP/FSDP gradient all-reduce on every trainable module until the last micro-batch."""
        stack = contextlib.ExitStack()
        if not sync:
            for module in self.method.model_dict.values():
                stack.enter_context(self.acc.no_sync(module))
        return stack

    def _early_backward(self, loss: torch.Tensor) -> None:
        """The method's ``backward_now``: this iteration's backward (1/G, loss scaling), out of autocast as the
        backward of ``total_loss`` is."""
        with torch.autocast(self.acc.device.type, enabled=False):
            self._backward(loss)

    def _backward(self, loss: torch.Tensor) -> None:
        """accelerate's backward (loss scaling) of one micro-batch's share, loss / G (no division at G = 1)."""
        g = self.cfg.gradient_accumulation_steps
        self.acc.backward(loss if g == 1 else loss / g)

    def _forward_backward(self, iteration: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """The micro-batches' mean losses, and device values that are all finite iff every input was."""
        g = self.cfg.gradient_accumulation_steps
        sums: dict[str, torch.Tensor] = {}
        probes: list[torch.Tensor] = []
        self._host_batches = []  # scanned on the host only if the device finds a bad input
        for micro in range(g):
            host = next(self.batches)
            self._host_batches.append(host)
            batch = move_to(host, self.acc.device)
            probes += finite_probes(batch)
            with self._no_sync(sync=micro == g - 1):
                with self.method.backward_with(self._early_backward), self.acc.autocast():
                    loss_map, _ = self.method.train_step(batch, iteration)
                self._backward(loss_map["total_loss"])
            for k, v in loss_map.items():
                v = v.detach().float()
                sums[k] = v if g == 1 else sums.get(k, 0.0) + v / g
        return sums, probes

    def _clip(self, iteration: int) -> dict[str, torch.Tensor]:
        """Clip (or just measure) the grad norm of each module whose optimizer steps now.

        The norm is over the module's full parameters: DDP gradients are already
        reduced, FSDP2 gradients are DTensors whose norm torch reduces across shards.
        (accelerate's clip_grad_norm_ cannot tell several FSDP models apart.)
        """
        from torch.distributed.tensor import DTensor

        # context-parallel modules hold their ranks' partial gradients, averaged over all processes
        scale_partial_gradients(self.method.model_dict.values())
        # fp16: unscale once per iteration (the single trainable role fp16 allows), so the norms are
        # true norms; the scaler's update() follows in step(), whether the optimizer steps or not.
        self.acc.unscale_gradients()
        norms = {}
        for name, module, max_norm in self.method.grad_clip_targets(iteration):
            limit = max_norm if max_norm is not None else math.inf
            norm = torch.nn.utils.clip_grad_norm_(self._trainable_parameters(module), limit)
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            norms[f"grad_norm/{name}"] = norm.detach().float()
        return norms

    def _trainable_parameters(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        params = self._clip_params.get(id(module))
        if params is None:
            params = self._clip_params[id(module)] = [p for p in module.parameters() if p.requires_grad]
        return params

    def _finite(
        self, losses: list[torch.Tensor], norms: list[torch.Tensor], inputs: Sequence[torch.Tensor] = ()
    ) -> tuple[bool, bool, bool]:
        """(losses, gradient norms, inputs) finite on every rank: the iteration's one host-device sync.

        One ``isfinite`` over all the values stacked (``inputs``: :func:`finite_probes` of the batches)."""
        groups = (losses, norms, inputs)
        values = [v.reshape(()).to(self.acc.device, torch.float32) for group in groups for v in group]
        if not values:
            return True, True, True
        bad = ~torch.isfinite(torch.stack(values))
        ends = list(itertools.accumulate(len(group) for group in groups))
        if self.acc.num_processes > 1:  # every rank decides alike: the groups' bad counts, summed over ranks
            counts = [bad[a:b].sum() for a, b in zip([0, *ends], ends)]
            flags = self.acc.reduce(torch.stack(counts).float(), reduction="sum").tolist()
            return tuple(f == 0 for f in flags)
        bad = bad.tolist()
        return tuple(not any(bad[a:b]) for a, b in zip([0, *ends], ends))

    def _stop_on_bad_input(self, it: int) -> NoReturn:
        """A NaN/inf in this iteration's data, on some rank: one line naming its file and row, on every rank,
        before any optimizer step (a non-finite input is a data error, not an iteration to skip)."""
        found = next(filter(None, map(describe_nonfinite, self._host_batches)), None)
        if self.acc.num_processes > 1:
            found = next(filter(None, gather_object([found])), None)
        raise DataError(found or f"iteration {it}: non-finite values (NaN or inf) in the input batch")

    def _log(self, metrics: dict[str, torch.Tensor], step_time: float) -> dict[str, float]:
        names = sorted(metrics)
        stacked = torch.stack([metrics[n].reshape(()) for n in names])
        means = self.acc.reduce(stacked, reduction="mean").tolist() if self.acc.num_processes > 1 else stacked.tolist()
        logs = dict(zip(names, means))
        logs.update(self.pending_extras)
        self.pending_extras = {}
        for name, opt in self.method.optimizer_dict.items():
            logs[f"lr/{name}"] = opt.param_groups[0]["lr"]
        if self.acc.scaler is not None:
            logs["loss_scale"] = float(self.acc.scaler.get_scale())
        logs.update(step_time=step_time, skipped_steps=float(self.state.skipped_steps))
        self.acc.log(logs, step=self.state.iteration)
        if self.metrics_file is not None and self.acc.is_main_process:
            with open(self.metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({"iteration": self.state.iteration, **logs}) + "\n")
        return logs

    # --- the loop -----------------------------------------------------------------------
    def step(self) -> dict[str, torch.Tensor]:
        """One iteration: G micro-batches, then clip + step (or skip if non-finite)."""
        it = self.state.iteration
        metrics, probes = self._forward_backward(it)
        norms = self._clip(it)
        loss_ok, grads_ok, inputs_ok = self._finite(list(metrics.values()), list(norms.values()), probes)
        if not inputs_ok:
            self._stop_on_bad_input(it)
        metrics.update(norms)
        stepped: list[str] = []
        if loss_ok and grads_ok:
            self.method.optimizers_schedulers_step(it)  # with fp16, accelerate's optimizer updates the scaler
            self.state.consecutive_nonfinite = 0
            current = self.method.get_optimizers(it)
            stepped = [name for name, opt in self.method.optimizer_dict.items() if opt in current]
        else:
            self._skip(it, scale_overflow=loss_ok)
        self.method.optimizers_zero_grad(it)
        self.state.iteration += 1
        for callback in self.callbacks:
            self.pending_extras.update({k: float(v) for k, v in callback.on_step_end(self, it, stepped).items()})
        return metrics

    def _skip(self, it: int, *, scale_overflow: bool) -> None:
        """Skip this iteration's update; raise after too many in a row.

        With fp16, a finite loss whose gradients overflow is the loss scaler finding its
        range (normal early on): the scaler backs off and it does not count as divergence
        until the scale falls below ``MIN_LOSS_SCALE``.
        """
        self.state.skipped_steps += 1
        scaler = self.acc.scaler
        if scaler is not None:
            scaler.update()  # halves the scale after an overflow; the next unscale_ needs it either way
        overflow = scaler is not None and scale_overflow and scaler.get_scale() >= MIN_LOSS_SCALE
        if overflow:
            logger.info(
                f"iteration {it}: fp16 gradient overflow, update skipped, loss scale lowered", main_process_only=True
            )
        else:
            self.state.consecutive_nonfinite += 1
            logger.warning(f"iteration {it}: non-finite loss or gradient, update skipped", main_process_only=True)
            if self.state.consecutive_nonfinite >= self.cfg.max_consecutive_nonfinite:
                raise TrainingDiverged(
                    f"training diverged: {self.state.consecutive_nonfinite} consecutive iterations with a non-finite "
                    f"loss or gradient (training.max_consecutive_nonfinite) at iteration {it}; lower the learning "
                    "rate or check the data"
                )

    def run(self) -> TrainerState:
        cfg = self.cfg
        for callback in self.callbacks:
            callback.on_train_start(self)
        bar = tqdm(
            total=cfg.max_train_steps,
            initial=self.state.iteration,
            desc="train",
            disable=not self.acc.is_local_main_process,
        )
        while self.state.iteration < cfg.max_train_steps:
            start = time.perf_counter()
            metrics = self.step()
            elapsed = time.perf_counter() - start
            it = self.state.iteration
            if it % cfg.log_every == 0 or it == cfg.max_train_steps:
                logs = self._log(metrics, elapsed)
                bar.set_postfix(loss=f"{logs['total_loss']:.4g}", step_s=f"{elapsed:.2f}")
            bar.update(1)
            if self.save_checkpoint and (it % cfg.checkpointing_steps == 0 or it == cfg.max_train_steps):
                self.save_checkpoint(self.state)
        bar.close()
        for callback in self.callbacks:
            callback.on_train_end(self)
        return self.state
