"""Euler integration of any velocity callable ``velocity_fn(x, t) -> v`` with x (B, ...), t (B,).

Conditioning and guidance are closed over by the caller (e.g. ``lambda x, t: guided(net, 2.0)(x, t, cond)``),
so one solver serves the teacher, the aux flow and toy fields alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from occ_mfd.flow.path import expand_time

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def euler_integrate(velocity_fn: VelocityFn, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) with explicit Euler along ``grid``.

    grid: (K+1,) shared by the batch, or (B, K+1) per sample (same number of steps K, any step sizes).
    Returns x at the grid's last time, shape of ``x``. NFE = K.
    """
    B = x.shape[0]
    if grid.ndim == 1:
        grid = grid.unsqueeze(0).expand(B, -1)
    if grid.ndim != 2 or grid.shape[0] != B or grid.shape[1] < 2:
        raise ValueError(f"grid must be (K+1,) or ({B}, K+1) with K >= 1, got {tuple(grid.shape)}")
    grid = grid.to(device=x.device, dtype=x.dtype)
    for k in range(grid.shape[1] - 1):
        t, t_next = grid[:, k], grid[:, k + 1]
        x = x + expand_time(t_next - t, x) * velocity_fn(x, t)
    return x


@dataclass
class MeanVelocity:
    """Result of :func:`euler_mean_velocity`.

    ``mean_velocity``: (B, ...) the Euler estimate of (x_t - x_s)/(t - s); for s = t it is v(x_s, s).
    ``displacement``: (B, ...) x_t - x_s = (t - s) * mean_velocity. ``nfe``: sequential evaluations used.
    """

    mean_velocity: torch.Tensor
    displacement: torch.Tensor
    nfe: int


def euler_mean_velocity(
    velocity_fn: VelocityFn, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor, h: float
) -> MeanVelocity:
    """Mean velocity of the ODE over per-sample intervals [s, t] (MFD paper, Eq. 18-19).

    One shared number of sub-steps n = ceil(max(t - s) / h) (at least 1) keeps the batch together;
    each sample steps by (t - s)/n <= h. The mean velocity is the average of the n Euler velocities,
    which equals displacement/(t - s) for t > s and is the instantaneous velocity v(x_s, s) for t = s
    (then every step has size 0) -- no division by t - s, so VSD's s = t needs no special case.
    """
    if h <= 0:
        raise ValueError(f"ode step h must be > 0, got {h}")
    if s.shape != t.shape or s.ndim != 1 or s.shape[0] != x_s.shape[0]:
        raise ValueError(f"s {tuple(s.shape)} and t {tuple(t.shape)} must both be ({x_s.shape[0]},)")
    length = (t - s).to(x_s.dtype)
    if (length < 0).any():
        raise ValueError("euler_mean_velocity needs s <= t for every sample")
    n = max(1, math.ceil(float(length.max()) / h - 1e-9))
    dt = length / n  # (B,)
    x, tau = x_s, s.to(x_s.dtype)
    acc = torch.zeros_like(x_s)
    for _ in range(n):
        v = velocity_fn(x, tau)
        acc = acc + v
        x = x + expand_time(dt, x) * v
        tau = tau + dt
    mean_v = acc / n
    return MeanVelocity(mean_velocity=mean_v, displacement=x - x_s, nfe=n)
