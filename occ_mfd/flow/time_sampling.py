"""Time distributions for training and time grids for sampling (t = 0 noise, t = 1 data)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitNormalTime:
    """t = sigmoid(N(mean, std^2)) (SD3, Esser et al. 2024, Sec. 3.1). Symmetric about 1/2 for mean 0."""

    mean: float = 0.0
    std: float = 1.0

    def __call__(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(n, device=device, generator=generator)
        return torch.sigmoid(self.mean + self.std * z)  # (n,)


@dataclass(frozen=True)
class UniformTime:
    """t ~ U(0, 1)."""

    def __call__(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(n, device=device, generator=generator)  # (n,)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's sigma-shift in our convention.

    SD3 (noise at sigma = 1) uses sigma' = a*sigma / (1 + (a - 1)*sigma). With sigma = 1 - t:
        t' = 1 - sigma' = t / (a - (a - 1) t) = t / (1 + (a - 1)(1 - t)).
    Endpoints are fixed (0 -> 0, 1 -> 1); dt'/dt = a / (a - (a - 1) t)^2 is 1/a at t = 0 and a at t = 1,
    so for a > 1 a uniform grid maps to small steps near noise and large steps near data.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return t / (shift - (shift - 1.0) * t)


def time_grid(steps: int, shift: float = 1.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """(steps + 1,) increasing grid from 0 (noise) to 1 (data); ``shift`` = 1 gives a uniform grid."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    u = torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=torch.float64)
    g = shift_time(u, float(shift))
    g[0], g[-1] = 0.0, 1.0  # exact endpoints despite rounding
    return g.to(dtype)
