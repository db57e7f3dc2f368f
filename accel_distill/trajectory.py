"""Points on a teacher's deterministic sampling path, for trajectory data (``generate``) and ``kd``.

A deterministic step of the samplers here (rectified-flow Euler, DDIM) keeps the predicted x0 and
noise fixed: between two consecutive steps the sample moves along ``x(t) = a(t) x0 + s(t) noise``
(for a rectified flow the straight line in sigma). Two samples on that path determine it, so the
sample at any timestep between them is exactly where the teacher's step passes at that time.
Timestep 0 is the clean end, ``(a, s) = (1, 0)``, whatever the schedule's first training timestep.
Timesteps are per sample, ``[B]``.
"""

from __future__ import annotations

import torch

from accel_distill.noise import NoiseSchedule


def broadcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``v`` [B] shaped to broadcast over ``like`` [B, ...]."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def path_coefficients(noise: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, s) with x_t = a x0 + s noise at timesteps ``t`` [B], shaped to broadcast over ``like``; (1, 0) at t = 0."""
    shape = (t.shape[0], *([1] * (like.dim() - 1)))
    one, zero = torch.ones(shape, device=like.device), torch.zeros(shape, device=like.device)
    clean = (t == 0).view(shape)
    a = torch.where(clean, 1.0, noise.add_noise(one, zero, t))
    return a, torch.where(clean, 0.0, noise.add_noise(zero, one, t))


def path_x0(x_a: torch.Tensor, ca: tuple, x_b: torch.Tensor, cb: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, noise) of the path x = a x0 + s noise through x_a (coefficients ``ca``) and x_b (``cb``)."""
    (a1, s1), (a2, s2) = ca, cb
    det = a1 * s2 - a2 * s1
    return (s2 * x_a - s1 * x_b) / det, (a1 * x_b - a2 * x_a) / det


def path_point(
    noise: NoiseSchedule, x_a: torch.Tensor, t_a: torch.Tensor, x_b: torch.Tensor, t_b: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The sample at ``t`` on the path through ``x_a`` at ``t_a`` and ``x_b`` at ``t_b``; exactly x_a / x_b there."""
    x0, eps = path_x0(x_a, path_coefficients(noise, t_a, x_a), x_b, path_coefficients(noise, t_b, x_a))
    a, s = path_coefficients(noise, t, x_a)
    between = a * x0 + s * eps
    return torch.where(broadcast(t == t_a, x_a), x_a, torch.where(broadcast(t == t_b, x_a), x_b, between))


def trajectory_point(
    noise: NoiseSchedule, points: torch.Tensor, times: torch.Tensor, clean: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The teacher's sample at ``t`` [B] from stored ``points`` [B, S, ...] at ``times`` [B, S] (decreasing, > 0)
    and the final x0 ``clean`` [B, ...] (timestep 0): a stored point where ``t`` is its timestep, else the path
    through its two stored neighbours (the clean end below the last). ``t`` must not exceed ``times[:, 0]``."""
    b, n = torch.arange(t.shape[0], device=t.device), times.shape[1]
    above = ((times >= t.unsqueeze(1)).sum(1) - 1).clamp(0, n - 1)  # the last stored point at or above t
    below = (above + 1).clamp(max=n - 1)
    inside = above + 1 < n  # else the clean end is the neighbour below
    x_b = torch.where(broadcast(inside, clean), points[b, below], clean)
    t_b = torch.where(inside, times[b, below], 0.0)
    return path_point(noise, points[b, above], times[b, above], x_b, t_b, t)
