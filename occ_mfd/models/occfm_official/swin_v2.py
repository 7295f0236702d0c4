"""Swin Transformer V2 stages as used by the released OccFM VAE (our implementation).

Method: Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022: attention inside
non-overlapping ``w × w`` windows, every second block on windows shifted by ``w // 2`` (a cyclic roll plus a
mask that keeps tokens from wrapped-around regions apart), *cosine* attention with a learned per-head
temperature, a continuous relative position bias produced by a small MLP from log-spaced offsets, and
"res-post-norm" blocks (the LayerNorm is applied to the branch output, before the residual add).

Only what the OccFM checkpoints need is here (no drop-path, no dropout, no pretrained-window rescaling). The
names of parameters and buffers, and the buffers' shapes and dtypes, are those of the released weights
(``tests/goldens/occfm_state_dict_keys.tsv``): every block stores ``attn.relative_coords_table`` (1, 2w-1,
2w-1, 2) float32 and ``attn.relative_position_index`` (w², w²) int64; shifted blocks also ``attn_mask``
(nW, w², w²) float32. The forward pass reads these *stored* buffers and never recomputes them: the released
EMA copies may carry ``relative_position_index`` values that training's EMA update truncated, and the
official numbers were computed with whatever the file holds.

Layout: a stage takes and returns tokens (B, H·W, C) in row-major order (token = h·W + w).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Upper bound of the learned log-temperature of cosine attention: the scale exp(·) is at most 100.
LOGIT_SCALE_MAX = math.log(100.0)
#: Hidden width of the continuous position-bias MLP (fixed by the released weights).
CPB_HIDDEN = 512
#: Additive mask value between tokens of different regions in a shifted window (finite, as upstream).
MASK_VALUE = -100.0


# ---------------------------------------------------------------------------------------------- windows
def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) → (B·nW, window², C), windows in row-major order per image, batch outermost."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def window_reverse(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """(B·nW, window², C) → (B, H, W, C); the inverse of :func:`window_partition`."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def effective_window(resolution: tuple[int, int], window: int, shift: int) -> tuple[int, int]:
    """(window, shift) actually used at ``resolution``: when the map is no larger than a window, one window
    covers it and nothing is shifted (Swin's rule; the reduced goldens and small maps rely on it)."""
    if min(resolution) <= window:
        return min(resolution), 0
    return window, shift


# ------------------------------------------------------------------------------------- fixed tables
def relative_coords_table(window: int) -> torch.Tensor:
    """(1, 2w-1, 2w-1, 2) float32 input of the position-bias MLP, for every (Δrow, Δcol) offset.

    Offsets are scaled to [-8, 8] and log-spaced: ``sign(d)·log2(1 + 8|d|/(w-1)) / 3``, so the table spans
    [-1, 1] (computed in float32 in this order, like the released buffers)."""
    if window < 2:
        raise ValueError(f"relative_coords_table: window must be >= 2, got {window}")
    d = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1)[None]   # (1, 2w-1, 2w-1, 2): (Δrow, Δcol)
    table = table / (window - 1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0         # log2(8) = 3


def relative_position_index(window: int) -> torch.Tensor:
    """(w², w²) int64: row of the bias table for the token pair (i, j) of a window.

    ``(r_i - r_j + w - 1)·(2w - 1) + (c_i - c_j + w - 1)`` with (r, c) a token's row and column; the bias
    table rows are the (Δrow, Δcol) grid of :func:`relative_coords_table`, flattened row-major."""
    r, c = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)                                    # (w²,) each
    dr = r[:, None] - r[None, :] + window - 1                              # (w², w²) in [0, 2w-2]
    dc = c[:, None] - c[None, :] + window - 1
    return dr * (2 * window - 1) + dc


def shifted_window_mask(H: int, W: int, window: int, shift: int) -> torch.Tensor:
    """(nW, w², w²) float32 additive mask for attention in windows of a map rolled by ``-shift``.

    After the roll, the last window row/column holds tokens from opposite borders. Each axis is cut into the
    slices [0, -w), [-w, -shift), [-shift, end); a token's region is (row slice, column slice), and a pair of
    tokens from different regions gets :data:`MASK_VALUE`, the rest 0."""
    def axis_labels(n: int) -> torch.Tensor:
        lab = torch.zeros(n)
        lab[n - window:n - shift] = 1
        lab[n - shift:] = 2
        return lab

    region = axis_labels(H)[:, None] * 3 + axis_labels(W)[None, :]         # (H, W) region id 0..8
    regions = window_partition(region[None, :, :, None], window)[..., 0]   # (nW, w²)
    differs = regions[:, None, :] != regions[:, :, None]                   # (nW, w², w²)
    return torch.zeros(differs.shape).masked_fill(differs, MASK_VALUE)


# -------------------------------------------------------------------------------------------- modules
class WindowAttentionV2(nn.Module):
    """Cosine multi-head self-attention inside windows, with the continuous relative position bias.

    ``logits = cos(q_i, k_j) · exp(min(logit_scale, log 100)) + 16·sigmoid(cpb_mlp(table)[index[i, j]]) + mask``
    (per head). qkv has no bias of its own: with ``qkv_bias`` the q and v parts get ``q_bias``/``v_bias`` and
    k a zero bias (as released; with cosine attention a key bias would *not* cancel, so this matters)."""

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WindowAttentionV2: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, CPB_HIDDEN), nn.ReLU(), nn.Linear(CPB_HIDDEN, num_heads, bias=False))
        self.register_buffer("relative_coords_table", relative_coords_table(window))      # (1, 2w-1, 2w-1, 2)
        self.register_buffer("relative_position_index", relative_position_index(window))  # (w², w²)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)

    def position_bias(self) -> torch.Tensor:
        """(heads, w², w²) bias from the *stored* coordinate table and index buffers."""
        n = self.window * self.window
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)  # ((2w-1)², heads)
        # Plain tensor indexing, as in the released model: an out-of-range (e.g. EMA-shifted) entry behaves
        # the same here as there (negative values wrap around).
        bias = table[self.relative_position_index.view(-1)].view(n, n, self.num_heads)
        return 16.0 * torch.sigmoid(bias.permute(2, 0, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B·nW, N, C), mask (nW, N, N) or None → (B·nW, N, C)."""
        Bw, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(Bw, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # (Bw, heads, N, d) each
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)   # (Bw, heads, N, N) cosines
        attn = attn * self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
        attn = attn + self.position_bias()[None]
        if mask is not None:
            nW = mask.shape[0]                                             # windows per image (batch outermost)
            attn = (attn.view(Bw // nW, nW, self.num_heads, N, N) + mask[None, :, None]).view(Bw, self.num_heads, N, N)
        out = attn.softmax(dim=-1) @ v                                     # (Bw, heads, N, d)
        return self.proj(out.transpose(1, 2).reshape(Bw, N, C))


class SwinMlp(nn.Module):
    """fc1 → GELU (exact) → fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinV2Block(nn.Module):
    """(Shifted-)window attention and MLP, res-post-norm: ``x + norm1(attn(x))``, then ``x + norm2(mlp(x))``.

    ``resolution`` (H, W) is fixed at construction (it sizes ``attn_mask``); ``window``/``shift`` are the
    requested values, reduced by :func:`effective_window` for small maps."""

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window: int, shift: int = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.window, self.shift = effective_window(self.resolution, window, shift)
        H, W = self.resolution
        if H % self.window or W % self.window:
            raise ValueError(f"SwinV2Block: resolution {H}×{W} is not a multiple of the window {self.window}")
        if not 0 <= self.shift < self.window:
            raise ValueError(f"SwinV2Block: shift {self.shift} must be in [0, window {self.window})")
        if self.shift:
            self.register_buffer("attn_mask", shifted_window_mask(H, W, self.window, self.shift))  # (nW, N, N)
        else:
            self.attn_mask = None  # unshifted blocks store no mask (none in the released state_dict)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttentionV2(dim, self.window, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H·W, C) → (B, H·W, C)."""
        H, W = self.resolution
        B, L, C = x.shape
        if L != H * W:
            raise ValueError(f"SwinV2Block: expected {H}×{W} = {H * W} tokens, got {L}")
        y = x.reshape(B, H, W, C)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, self.window), self.attn_mask)    # (B·nW, w², C)
        y = window_reverse(y, self.window, H, W)                           # (B, H, W, C)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.norm1(y.reshape(B, L, C))
        return x + self.norm2(self.mlp(x))


class SwinV2Stage(nn.Module):
    """``depth`` blocks at one resolution; odd-indexed blocks use windows shifted by ``window // 2``."""

    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, window: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinV2Block(dim, resolution, num_heads, window, shift=0 if i % 2 == 0 else window // 2,
                        mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H·W, C) → (B, H·W, C)."""
        for blk in self.blocks:
            x = blk(x)
        return x
