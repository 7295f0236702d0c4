"""Fixed sinusoidal embeddings shared by the VAE and the forecaster (no learned parameters here).

All use the transformer form ``[sin(p·ω_0..ω_{d/2-1}), cos(p·ω_0..ω_{d/2-1})]`` with
``ω_i = max_period^(-i / (d/2))`` (Vaswani et al. 2017; DiT/ADM timestep embedding).
"""
from __future__ import annotations

import math

import torch


def sincos_1d(pos: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(...,) positions → (..., dim) embedding ``[sin(p·ω), cos(p·ω)]``; ``dim`` must be even."""
    if dim % 2:
        raise ValueError(f"sincos_1d: dim must be even, got {dim}")
    half = dim // 2
    pos = pos if pos.is_floating_point() else pos.float()   # keeps float64 for float64 inputs (jvp checks)
    omega = torch.exp(-math.log(max_period) * torch.arange(half, dtype=pos.dtype, device=pos.device) / half)
    ang = pos[..., None] * omega  # (..., half)
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


def height_embedding(grid_z: int, dim: int = 4) -> torch.Tensor:
    """(Z, dim) fixed sin/cos embedding of the z-slice index (OccFM's height embedding)."""
    return sincos_1d(torch.arange(grid_z), dim)


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """(B,) t ∈ [0, 1] → (B, dim). t is scaled by ``scale`` here and only here (docs/design.md, time convention)."""
    return sincos_1d(t * scale, dim)


def sincos_2d(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """(h·w, dim) 2-D sin-cos positions (MAE/DiT): half the channels encode rows, half columns."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be divisible by 4, got {dim}")
    yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.cat([sincos_1d(yy.reshape(-1), dim // 2), sincos_1d(xx.reshape(-1), dim // 2)], dim=-1)


def fourier_features(x: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """(..., D) → (..., D·(2·num_freqs + 1)): ``[x, sin(2^k π x), cos(2^k π x)]`` for k < num_freqs (NeRF)."""
    freqs = (2.0 ** torch.arange(num_freqs, dtype=torch.float32, device=x.device)) * math.pi
    ang = x[..., None] * freqs  # (..., D, K)
    feats = torch.cat([x[..., None], torch.sin(ang), torch.cos(ang)], dim=-1)
    return feats.flatten(-2)
