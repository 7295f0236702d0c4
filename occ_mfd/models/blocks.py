"""Forecaster blocks on video-like feature maps h: (B, T, C, H, W).

- :class:`TimeResBlock`: per-frame 2-D residual block, conditioned by scale/shift from the embedding
  (ADM/EDM style); the conditioning vector may be per sample (B, D).
- :class:`SpatialAttnBlock` / :class:`TemporalAttnBlock`: DiT blocks (Peebles & Xie 2023) with adaLN-Zero
  — attention + MLP, each gated by a zero-initialised modulation, so both are the identity at init.
  Spatial attends over H·W per frame with 2-D sin-cos positions; temporal over T per location with
  1-D sin-cos positions (2+1-D factorisation, as OccFM).
Attention goes through ``F.scaled_dot_product_attention``; ``attn_backend="math"`` forces the math
kernel, which ``torch.func.jvp`` needs (fused kernels have no forward-mode AD).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from occ_mfd.models.embeddings import sincos_1d, sincos_2d
from occ_mfd.models.vae_blocks import group_norm

ATTN_BACKENDS = ("auto", "math")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """(N, heads, L, d) → (N, heads, L, d). ``backend``: "auto" (PyTorch picks) or "math"."""
    if backend == "math":
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    if backend != "auto":
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {backend!r}")
    return F.scaled_dot_product_attention(q, k, v)


class TimeResBlock(nn.Module):
    """(B, T, C_in, H, W) + emb (B, D) → (B, T, C_out, H, W)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2, self.conv2 = group_norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        x = x.flatten(0, 1)                                                    # (B·T, C, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb)).repeat_interleave(T, 0)[..., None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        out = self.skip(x) + h
        return out.unflatten(0, (B, T))


class _DiTBlock(nn.Module):
    """adaLN-Zero attention + MLP over tokens (N, L, C), conditioned by c (N, D)."""

    def __init__(self, ch: int, emb_dim: int, heads: int, attn_backend: str = "auto", mlp_ratio: float = 2.0):
        super().__init__()
        if ch % heads:
            raise ValueError(f"channels {ch} not divisible by heads {heads}")
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {attn_backend!r}")
        self.heads, self.attn_backend = heads, attn_backend
        self.norm1 = nn.LayerNorm(ch, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(ch, 3 * ch), nn.Linear(ch, ch)
        self.norm2 = nn.LayerNorm(ch, elementwise_affine=False, eps=1e-6)
        hidden = int(ch * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(ch, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, ch))
        self.ada = nn.Linear(emb_dim, 6 * ch)
        nn.init.zeros_(self.ada.weight)   # adaLN-Zero: all gates start at 0 → the block is the identity
        nn.init.zeros_(self.ada.bias)

    def tokens(self, x: torch.Tensor, c: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (N, L, C), c (N, D), pos (L, C) → (N, L, C)."""
        N, L, C = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c))[:, None].chunk(6, dim=-1)  # each (N, 1, C)
        h = self.norm1(x) * (1 + sc1) + sh1 + pos.to(x.dtype)
        q, k, v = self.qkv(h).view(N, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v, self.attn_backend).transpose(1, 2).reshape(N, L, C)
        x = x + g1 * self.proj(a)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


class SpatialAttnBlock(_DiTBlock):
    """Attention over the H·W locations of each frame. (B, T, C, H, W) + emb (B, D) → same."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        B, T, C, H, W = x.shape
        tok = x.flatten(3).transpose(2, 3).flatten(0, 1)                       # (B·T, H·W, C)
        out = self.tokens(tok, emb.repeat_interleave(T, 0), sincos_2d(H, W, C, device=x.device))
        return out.view(B, T, H, W, C).permute(0, 1, 4, 2, 3)


class TemporalAttnBlock(_DiTBlock):
    """Attention over the T frames at each location. (B, T, C, H, W) + emb (B, D) → same."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        B, T, C, H, W = x.shape
        tok = x.permute(0, 3, 4, 1, 2).reshape(B * H * W, T, C)                # (B·H·W, T, C)
        pos = sincos_1d(torch.arange(T, device=x.device), C)
        out = self.tokens(tok, emb.repeat_interleave(H * W, 0), pos)
        return out.view(B, H, W, T, C).permute(0, 3, 4, 1, 2)
