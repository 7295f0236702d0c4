"""Convolutional building blocks of the occupancy VAE (2-D, on the BEV plane)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide ``ch`` (per-sample: keeps batch elements independent)."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if ch % g == 0)
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResBlock2d(nn.Module):
    """Pre-activation residual block: GN → SiLU → conv3 → GN → SiLU → conv3, 1×1 skip when widths differ."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = group_norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample2d(nn.Module):
    """Stride-2 3×3 conv (ceil(H/2) × ceil(W/2))."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2d(nn.Module):
    """Nearest ×2 (or to an explicit size) then 3×3 conv."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest") if size else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)
