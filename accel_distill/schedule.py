"""Few-step timestep schedules that stock diffusers reproduces at inference.

A DMD student is trained at a fixed list of timesteps. A stock pipeline only
calls ``scheduler.set_timesteps(N)``, so the exported scheduler's *config*
must generate those timesteps. ``FlowMatchLCMScheduler`` (x0 prediction, then
re-noise) gives ``sigmas = stretch(shift_fn(linspace(1, shift_fn(1/1000), N)))``;
its two free parameters, ``shift`` and ``shift_terminal``, express any 1-3
step list exactly and longer lists approximately. :func:`fit_few_step_schedule`
finds them and returns the timesteps the scheduler really produces, so that
training and inference use the very same float values.

:class:`StockSchedule` is what export, validation and the samplers need of any
such schedule (rectified flow here, DDPM in :mod:`accel_distill.noise`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000

# Search grid for log(shift): shift in [1e-4, 1e4], step 0.05; 0.0 (shift=1) is on it.
_LOG_SHIFT_GRID = np.arange(-184, 185) * 0.05
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


# How a few-step student moves between its timesteps, and the stock scheduler that does it.
# Both share set_timesteps, so one (shift, shift_terminal) fit serves either.
SCHEDULER_CLASSES = {"sde": "FlowMatchLCMScheduler", "ode": "FlowMatchEulerDiscreteScheduler"}


class StockSchedule(ABC):
    """What export, validation and the samplers need of a schedule, whatever the noise schedule.

    The timesteps a stock diffusers scheduler visits for ``num_inference_steps``, their noise levels,
    and how to build that scheduler (its class and config, saved in the export). ``kind`` says how a
    sample moves between steps ("sde", "ode"). Subclasses are frozen dataclasses with a ``timesteps`` field
    (validation derives other step counts with ``dataclasses.replace``).
    """

    timesteps: tuple[float, ...]
    kind: str

    @property
    @abstractmethod
    def scheduler_class(self) -> str:
        """The diffusers scheduler class the export saves and the stock pipeline loads."""

    @abstractmethod
    def scheduler_config(self) -> dict[str, Any]:
        """Keyword arguments for :attr:`scheduler_class`."""

    @property
    @abstractmethod
    def sigmas(self) -> tuple[float, ...]:
        """The noise level (std of the noise in x_t) at each step plus the terminal 0, recorded in the export."""

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def make_scheduler(self):
        """A fresh stock scheduler of :attr:`scheduler_class` built from :meth:`scheduler_config`."""
        import diffusers

        return getattr(diffusers, self.scheduler_class)(**self.scheduler_config())


@dataclass(frozen=True)
class FewStepSchedule(StockSchedule):
    """Timesteps a flow-matching scheduler ``(shift, shift_terminal)`` produces for ``len(timesteps)`` steps.

    ``kind`` "sde" re-noises the predicted x0 between steps (DMD, ``FlowMatchLCMScheduler``);
    "ode" takes Euler steps (``FlowMatchEulerDiscreteScheduler``).
    """

    timesteps: tuple[float, ...]
    shift: float
    shift_terminal: float | None
    kind: str = "sde"

    @property
    def scheduler_class(self) -> str:
        return SCHEDULER_CLASSES[self.kind]

    def scheduler_config(self) -> dict[str, Any]:
        """Keyword arguments for ``diffusers.FlowMatchLCMScheduler``."""
        return {
            "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
            "shift": float(self.shift),
            "shift_terminal": None if self.shift_terminal is None else float(self.shift_terminal),
        }

    @property
    def sigmas(self) -> tuple[float, ...]:
        """The scheduler's float32 sigmas (about ``timesteps / 1000``) plus the terminal 0.

        Taken from the scheduler itself, because ``fl32(t) / 1000`` can differ from
        the sigma it stepped with by one ulp; the sampler needs the exact values.
        """
        sched = self.make_scheduler()
        sched.set_timesteps(self.num_inference_steps)
        return tuple(float(s) for s in sched.sigmas.tolist())


def with_step_count(base: StockSchedule, num_steps: int) -> StockSchedule | None:
    """``base`` at another step count: the timesteps its scheduler's ``set_timesteps(num_steps)`` gives
    (None if they are not finite), e.g. a many-step schedule for N-step sampling."""
    sched = base.make_scheduler()
    with np.errstate(all="ignore"):
        sched.set_timesteps(num_steps)
    timesteps = tuple(float(x) for x in sched.timesteps.tolist())
    if not all(math.isfinite(x) for x in timesteps):
        return None
    return dataclasses.replace(base, timesteps=timesteps)


def _produced(shift: float, shift_terminal: float | None, n: int) -> list[float] | None:
    """Timesteps the real scheduler gives for ``n`` steps, or None if they are not finite."""
    sched = FewStepSchedule((), shift, shift_terminal).make_scheduler()
    with np.errstate(all="ignore"):
        sched.set_timesteps(n)
    values = [float(t) for t in sched.timesteps.tolist()]
    return values if all(math.isfinite(v) for v in values) else None


def max_timestep_error(produced: list[float] | None, wanted: Sequence[float]) -> float:
    """Largest |produced - wanted| over the steps; inf when the scheduler produced nothing usable."""
    if produced is None:
        return math.inf
    return max(abs(p - w) for p, w in zip(produced, wanted))


def checked_timesteps(steps: Any, key: str) -> list[float]:
    """Checked, float copy of the user's list with one trailing 0 dropped."""
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise ConfigError(f"{key}: expected a list of timesteps, got {steps!r}")
    values: list[float] = []
    for v in steps:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise ConfigError(f"{key}: every timestep must be a finite number, got {v!r} in {list(steps)}")
        values.append(float(v))
    if len(values) > 1 and values[-1] == 0.0:
        values = values[:-1]  # seed form: a trailing 0 only marks the clean end
    if not values:
        raise ConfigError(f"{key}: needs at least one timestep in (0, {NUM_TRAIN_TIMESTEPS}], got {list(steps)}")
    if any(not 0.0 < v <= NUM_TRAIN_TIMESTEPS for v in values):
        raise ConfigError(
            f"{key}: timesteps must lie in (0, {NUM_TRAIN_TIMESTEPS}] (one trailing 0 is allowed), got {list(steps)}"
        )
    if any(a <= b for a, b in zip(values, values[1:])):
        raise ConfigError(f"{key}: timesteps must be strictly decreasing, got {list(steps)}")
    return values


def _fit_shift(wanted: list[float], shift_terminal: float) -> float:
    """log-shift minimising the max abs error: grid search, then golden section around the best point."""
    n = len(wanted)

    def err(log_shift: float) -> float:
        return max_timestep_error(_produced(math.exp(log_shift), shift_terminal, n), wanted)

    errors = [err(float(x)) for x in _LOG_SHIFT_GRID]
    # Best grid point; ties go to the shift closest to 1.
    best = min(range(len(errors)), key=lambda i: (errors[i], abs(_LOG_SHIFT_GRID[i])))
    lo = float(_LOG_SHIFT_GRID[max(best - 1, 0)])
    hi = float(_LOG_SHIFT_GRID[min(best + 1, len(errors) - 1)])
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = err(a), err(b)
    for _ in range(60):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = err(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = err(b)
    refined, f_refined = (a, fa) if fa <= fb else (b, fb)
    log_shift = refined if f_refined < errors[best] else float(_LOG_SHIFT_GRID[best])
    return math.exp(log_shift)


def fit_few_step_schedule(
    steps: Sequence[float],
    *,
    key: str = "method_config.dmd_denoising_steps",
    tolerance: float = 1.0,
    kind: str = "sde",
) -> FewStepSchedule:
    """Fit ``FlowMatchLCMScheduler`` (shift, shift_terminal) to the requested denoising timesteps.

    Accepts ints/floats, drops one trailing 0, requires strictly decreasing values in
    (0, 1000]. Raises :class:`ConfigError` naming ``key`` when the scheduler cannot
    produce every step within ``tolerance`` timestep units. The returned schedule
    holds the timesteps the scheduler actually produces (use those for training).
    """
    wanted = checked_timesteps(steps, key)
    n = len(wanted)
    if n == 1:
        shift, shift_terminal = 1.0, None  # set_timesteps(1) is always [1000]
    elif n == 2:
        shift, shift_terminal = 1.0, wanted[-1] / NUM_TRAIN_TIMESTEPS  # [1000, shift_terminal * 1000]
    else:
        shift_terminal = wanted[-1] / NUM_TRAIN_TIMESTEPS
        shift = _fit_shift(wanted, shift_terminal)

    produced = _produced(shift, shift_terminal, n)  # verified on the real scheduler
    error = max_timestep_error(produced, wanted)
    if produced is None or error > tolerance:
        closest = "none (non-finite)" if produced is None else str([round(t, 1) for t in produced])
        raise ConfigError(
            f"{key}: {n} timesteps {[round(w, 1) for w in wanted]} cannot be produced by stock "
            f"FlowMatchLCMScheduler within {tolerance:g}; closest expressible is {closest} "
            f"(max error {error:.1f}); choose timesteps closer to that list"
        )
    return FewStepSchedule(timesteps=tuple(produced), shift=shift, shift_terminal=shift_terminal, kind=kind)


# --- DDPM models (CogVideoX): deterministic DDIM steps of the model's own scheduler -------------------

DDIM_SCHEDULER = "CogVideoXDDIMScheduler"  # whose step arithmetic accel_distill.sampling.ddim_sample copies


@dataclass(frozen=True)
class DDIMSchedule(StockSchedule):
    """Timesteps ``CogVideoXDDIMScheduler`` visits for ``len(timesteps)`` steps with ``config``.

    ``config`` is the model's own scheduler config (its betas, SNR shift, zero-terminal-SNR
    rescaling: the alphas it trained with) with the spacing (``timestep_spacing``,
    ``steps_offset``) that produces ``timesteps``. Steps are deterministic DDIM ("ode").
    """

    timesteps: tuple[float, ...]
    config: dict[str, Any]
    kind: str = "ode"

    @property
    def scheduler_class(self) -> str:
        return DDIM_SCHEDULER

    def scheduler_config(self) -> dict[str, Any]:
        return dict(self.config)

    @property
    def sigmas(self) -> tuple[float, ...]:
        """``sqrt(1 - alphas_cumprod)`` at each timestep, then where the last step lands (0: the clean end)."""
        sched = self.make_scheduler()
        alphas = sched.alphas_cumprod
        last = int(self.timesteps[-1]) - sched.config.num_train_timesteps // max(self.num_inference_steps, 1)
        end = alphas[last] if last >= 0 else sched.final_alpha_cumprod
        return tuple(float((1 - alphas[int(t)]) ** 0.5) for t in self.timesteps) + (float((1 - end) ** 0.5),)


def _ddim_produced(config: dict[str, Any], n: int) -> list[float]:
    sched = DDIMSchedule((), config).make_scheduler()
    sched.set_timesteps(n)
    return [float(t) for t in sched.timesteps.tolist()]


def fit_ddim_schedule(
    steps: Sequence[float],
    model_config: dict[str, Any],
    *,
    key: str = "method_config.dmd_denoising_steps",
    tolerance: float = 1.0,
) -> DDIMSchedule:
    """The DDIM scheduler config (the model's, re-spaced) whose ``set_timesteps(len(steps))`` gives ``steps``.

    ``CogVideoXDDIMScheduler`` steps from ``t`` to ``t - T // n`` whatever its next timestep is, and
    ends on the clean sample only when the last step lands below 0. Only lists where both hold
    train as they sample: "trailing" spacing where it has them (999, 749, 499, 249 for 4 steps), else
    "leading" with ``steps_offset`` below ``T // n`` (``offset + k * (T // n)``). The closest such
    list within ``tolerance`` wins (ties: trailing); else a :class:`ConfigError` naming ``key``.
    The config keeps ``set_alpha_to_one`` true, so the last step returns the predicted x0.
    """
    wanted = checked_timesteps(steps, key)
    n = len(wanted)
    base = {**model_config, "set_alpha_to_one": True}
    total = int(base["num_train_timesteps"])
    stride = total // n

    def lands(ts: list[float]) -> bool:  # every step lands on the next timestep, the last one below 0
        return all(a - stride == b for a, b in zip(ts, ts[1:] + [ts[-1] - stride])) and ts[-1] - stride < 0

    trailing = {**base, "timestep_spacing": "trailing", "steps_offset": 0}
    candidates = [(trailing, _ddim_produced(trailing, n))]
    # leading: [offset + (n-1-i) * stride]; the offset minimising the max error, in [0, stride)
    top = min(stride - 1, total - 1 - (n - 1) * stride)
    if top >= 0:
        gaps = [w - (n - 1 - i) * stride for i, w in enumerate(wanted)]
        offset = min(max(round((min(gaps) + max(gaps)) / 2), 0), top)
        leading = {**base, "timestep_spacing": "leading", "steps_offset": offset}
        candidates.append((leading, [float(offset + (n - 1 - i) * stride) for i in range(n)]))
    usable = [(c, ts) for c, ts in candidates if lands(ts)]
    best = min(usable, key=lambda c: max_timestep_error(c[1], wanted), default=None)
    error = math.inf if best is None else max_timestep_error(best[1], wanted)
    if best is None or error > tolerance:
        closest = "none" if best is None else str(best[1])
        raise ConfigError(
            f"{key}: {n} timesteps {[round(w, 1) for w in wanted]} cannot be produced by stock {DDIM_SCHEDULER} "
            f"within {tolerance:g} (its steps go from t to t - {stride}); closest expressible is {closest} "
            f"(max error {error:.1f}); choose timesteps closer to that list"
        )
    config, _ = best
    produced = _ddim_produced(config, n)  # verified on the real scheduler
    if produced != best[1]:
        raise AssertionError(f"{DDIM_SCHEDULER} gave {produced}, expected {best[1]}")
    return DDIMSchedule(timesteps=tuple(produced), config=config)
