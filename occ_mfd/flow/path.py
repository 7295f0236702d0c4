"""The linear (rectified-flow / conditional-OT) probability path of docs/design.md (time convention).

t = 0 is noise, t = 1 is data: ``x_t = (1 - t) * x0 + t * x1`` and the conditional velocity is
``dx_t/dt = x1 - x0`` (Lipman et al. 2023, Eq. 20-23 with sigma_min = 0; Liu et al. 2023).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of flow state (noise, times, Euler x, latents): at least fp32, whatever autocast made of the
    latents (bf16 → fp32; fp64 toys stay fp64)."""
    return torch.promote_types(dtype, torch.float32)


def expand_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample ``t`` (B,) to (B, 1, ..., 1) so it broadcasts against ``like`` (B, ...)."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape ({like.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


@dataclass
class PathSample:
    """One draw from the path. ``x_t, x0, x1, dx_t``: (B, ...) same shape; ``t``: (B,)."""

    x_t: torch.Tensor
    t: torch.Tensor
    x0: torch.Tensor
    x1: torch.Tensor
    dx_t: torch.Tensor  # target velocity x1 - x0


class LinearPath:
    """x_t = (1 - t) x0 + t x1, target velocity x1 - x0."""

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = expand_time(t, x0)
        return (1 - tt) * x0 + tt * x1

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> PathSample:
        if x0.shape != x1.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and x1 {tuple(x1.shape)} must have the same shape")
        return PathSample(x_t=self.interpolate(x0, x1, t), t=t, x0=x0, x1=x1, dx_t=x1 - x0)

    @staticmethod
    def velocity_to_x1(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Data prediction implied by a velocity: x1 = x_t + (1 - t) v."""
        return x_t + (1 - expand_time(t, x_t)) * v
