"""The released OccFM flow net (upstream ``FLOW_MATCHING_DOWN_X4_DiT``), written from reading, with its key names.

A 2+1-D U-Net over the 12-frame latent window ``[0, 0, h₋₃ … h₀, x_t(6)]`` (PORT.md §1.2, §3):

    (B, 12, C, h, w) ─ Conv3d (1,k,k) stem ─ x + (x + TemporalAttn(ChanLN(x)))  ────────────────── stem skip ─┐
      level i (widths mult·c₀): Res, Res, spatial DiT, temporal DiT  (level 0: + position / frame tables) ─ skip │
        └ Conv3d (1,4,4) stride (1,2,2) between levels                                                         │
      mid: Res, SpatialAttn, TemporalAttn (T5 bias), Res                                                       │
      up levels (mirrored): [x ‖ skip] → Res, Res, spatial DiT, temporal DiT, ConvTranspose3d (1,4,4)           │
    [x ‖ stem skip] → Res (unconditioned) → Conv3d 1×1×1 → (B, 12, C, h, w) velocity for every frame  ◄─────────┘

Conditioning vector (width ``model_channels``) = MLP([cos, sin](t·freqs)) + MLP(Fourier(trajectory rows)); the
network receives t already ×1000. Every quirk that changes the function is reproduced on purpose (marked
"upstream quirk" below): the DiT attention merges heads without transposing them back, the time embedding is
[cos, sin] (not [sin, cos]), the spatial position table comes from a grid one column wider than the latent,
the stem adds its input twice, the trajectory features are Fourier terms of raw metres without the raw values,
the ResNet norm is an L2 normalisation over channels ×√C·γ.

``state_dict`` keys equal upstream's ``transition_model.*`` keys without that prefix (zero key map; the nested
``fn.fn.fn`` names of the plain attention blocks are upstream's wrapper chain, kept as named containers), so a
released checkpoint loads with ``load_state_dict`` after stripping ``module.transition_model.``. The frozen
tables ``pos_embed`` / ``temp_embed`` are Parameters in the checkpoint; we compute the same values here.

Attention is exact softmax attention, as on upstream's training and eval path: ``F.scaled_dot_product_attention``
(the DiT blocks, as upstream; the mid spatial attention) or a written-out softmax (the 12-frame temporal attention
with its T5 bias). Both run in fp32 and under bf16 autocast, have a backward, and support ``torch.func.jvp`` under
the math SDPA kernel (``models/flow_map.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from occ_mfd.models.occfm_official.upstream_config import flow_section

#: Frames of the window: 2 zero frames + 4 past + 6 future. ``temp_embed`` and the DiT conditioning are sized by it.
FRAMES = 12


# ------------------------------------------------------------------------------------------ fixed tables
def sincos_1d_table(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """(M,) positions → (M, dim) float64 ``[sin(p·ω), cos(p·ω)]``, ω_i = 10000^(−i/(dim/2)) (MAE/DiT tables)."""
    if dim % 2:
        raise ValueError(f"sin-cos table: dim must be even, got {dim}")
    half = dim // 2
    omega = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64) / half)
    ang = pos.to(torch.float64)[:, None] * omega                                    # (M, half)
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)


def spatial_pos_table(h: int, w: int, dim: int) -> torch.Tensor:
    """(h·w, dim) float32 position table added to the h·w tokens of the first level.

    Upstream quirk: the table is built for a square grid of side ⌊√(h·w)⌋ + 1 (51 for a 50×50 latent) and its
    first h·w rows are used, so token k = row·w + col gets the entry of grid cell (k mod side, k div side), not
    (col, row). The first half of the channels encodes that cell's column (k mod side), the second its row.
    """
    if dim % 4:
        raise ValueError(f"spatial position table: dim must be divisible by 4, got {dim}")
    side = math.isqrt(h * w) + 1
    k = torch.arange(h * w)
    table = torch.cat([sincos_1d_table(k % side, dim // 2), sincos_1d_table(k // side, dim // 2)], dim=1)
    return table.float()


def frame_table(frames: int, dim: int) -> torch.Tensor:
    """(frames, dim) float32 sin-cos table of the frame index, added to the temporal tokens of the first level."""
    return sincos_1d_table(torch.arange(frames), dim).float()


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) t as the net receives it (×1000 already) → (B, dim) float32 ``[cos(t·f), sin(t·f)]``.

    Upstream quirk: cos first (ADM's order, unlike this project's ``sincos_1d``); odd ``dim`` gets a zero column.
    Frequencies f_i = exp(−ln(max_period)·i/half) in float32, as upstream computes them.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = t.float()[:, None] * freqs[None]                                           # (B, half)
    emb = torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


def trajectory_features(traj: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """(B, n, 2) (dx, dy) in metres → (B, n·num_freqs·4) Fourier features, frame-major.

    Per frame and frequency f_k = 100^(k/num_freqs), k < num_freqs: [sin(f·dx), sin(f·dy), cos(f·dx), cos(f·dy)].
    Upstream quirk: applied to raw metres (no normalisation) and without the raw (dx, dy) themselves.
    """
    freqs = torch.pow(100.0, torch.arange(num_freqs, device=traj.device) / num_freqs).to(traj.dtype)
    ang = traj[..., None] * freqs                                                    # (B, n, 2, K)
    feats = torch.stack([torch.sin(ang), torch.cos(ang)], dim=-1)                    # (B, n, xy, K, sin|cos)
    return feats.permute(0, 1, 3, 4, 2).flatten(1)                                   # (B, n·K·[sin|cos]·xy)


def t5_relative_buckets(n: int, num_buckets: int = 32, max_distance: int = 16, device=None) -> torch.Tensor:
    """(n, n) int64 T5 bucket of the offset between query frame i and key frame j (bidirectional).

    Half the buckets are for keys at or before the query, half (offset by num_buckets/2) for keys after it; within
    a half, distances below num_buckets/4 get their own bucket and larger ones share log-spaced buckets up to
    ``max_distance`` (Raffel et al. 2020). With 12 frames and max_distance 16, every distance 0..11 is its own
    bucket.
    """
    pos = torch.arange(n, device=device)
    dist = pos[:, None] - pos[None, :]                                               # i − j: > 0 for past keys
    half = num_buckets // 2
    bucket = (dist < 0).long() * half                                                # future keys: upper half
    dist = dist.abs()
    exact = half // 2
    # float32 log, truncated toward zero, as upstream; clamp_min(1) only avoids log 0 where the exact bucket is used
    log_bucket = exact + (torch.log(dist.clamp_min(1).float() / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    log_bucket = log_bucket.clamp_max(half - 1)
    return bucket + torch.where(dist < exact, dist, log_bucket)


class T5RelativePositionBias(nn.Module):
    """``forward(n) -> (heads, n, n)`` learned bias per T5 bucket, added to the temporal attention logits."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 16):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def forward(self, n: int) -> torch.Tensor:
        buckets = t5_relative_buckets(n, self.num_buckets, self.max_distance, self.relative_attention_bias.weight.device)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)               # (heads, n, n)


# ------------------------------------------------------------------------------------------ norms and blocks
class ChannelLayerNorm(nn.Module):
    """Layer norm over the channels of (B, C, T, H, W): biased variance, eps 1e-5, scale γ, no shift."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, unbiased=False, keepdim=True)
        return (x - mean) / (var + self.eps).sqrt() * self.gamma


class ChannelRMSNorm(nn.Module):
    """x / ‖x‖₂ over the channels · √C · γ on (B, C, T, H, W) (no mean subtraction, no bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ConvNormAct(nn.Module):
    """Conv3d (1,3,3) over each frame → RMS norm → optional ×(1 + scale) + shift → SiLU. (B, C_in, T, H, W) →
    (B, C_out, T, H, W)."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.proj = nn.Conv3d(dim, dim_out, (1, 3, 3), padding=(0, 1, 1))
        self.norm = ChannelRMSNorm(dim_out)

    def forward(self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift                                               # each (B, C_out, 1, 1, 1)
            x = x * (scale + 1) + shift
        return F.silu(x)


class ResnetBlock(nn.Module):
    """``forward(x (B, C_in, T, H, W), emb (B, D) | None) -> (B, C_out, T, H, W)``.

    Two :class:`ConvNormAct`; the first is modulated by (scale, shift) = Linear(SiLU(emb)) (scale first). The skip
    is a 1×1×1 conv when the width changes. ``emb_dim=None``: no modulation (the output head's block).
    """

    def __init__(self, dim: int, dim_out: int, emb_dim: int | None = None):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * dim_out)) if emb_dim is not None else None
        self.block1 = ConvNormAct(dim, dim_out)
        self.block2 = ConvNormAct(dim_out, dim_out)
        self.res_conv = nn.Conv3d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        scale_shift = None
        if self.mlp is not None and emb is not None:
            scale_shift = self.mlp(emb)[:, :, None, None, None].chunk(2, dim=1)
        h = self.block2(self.block1(x, scale_shift))
        return h + self.res_conv(x)


class MultiHeadAttention(nn.Module):
    """Plain softmax self-attention without biases: ``forward(x (N, L, C), bias (heads, L, L) | None) -> (N, L, C)``.

    heads × dim_head may differ from C (e.g. 8 × 32 on 64 channels). Heads split and merge in the usual order.
    With a bias (the temporal attention: 12-frame sequences) the softmax is written out in upstream's order
    (scale q, add the bias): it costs nothing at that length and halves the rounding gap to upstream (golden max
    error 2.4e-6 instead of 3.8e-6). Without one (the 625-token mid spatial attention) SDPA picks a fused kernel.
    """

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        N, L, _ = x.shape
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.heads, self.dim_head)).permute(2, 0, 3, 1, 4)  # (N, h, L, d)
        if bias is None:
            out = F.scaled_dot_product_attention(q, k, v)                            # scale dim_head^-½
        else:
            logits = (q * self.dim_head ** -0.5) @ k.transpose(-1, -2) + bias.to(q.dtype)  # (N, h, L, L)
            out = logits.softmax(dim=-1).to(v.dtype) @ v
        return self.to_out(out.transpose(1, 2).reshape(N, L, self.heads * self.dim_head))


class AxisAttention(nn.Module):
    """``forward(x (B, C, T, H, W), bias=None) -> x + Attn(ChanLN(x))`` along time (per location) or space (per frame).

    The submodules sit at ``fn.norm`` and ``fn.fn.fn`` because upstream reaches them through three wrappers
    (residual → pre-norm → rearrange); keeping those names keeps the checkpoint's keys unchanged.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, axis: str):
        super().__init__()
        if axis not in ("time", "space"):
            raise ValueError(f"axis must be 'time' or 'space', got {axis!r}")
        self.axis = axis
        self.fn = nn.Module()                                # upstream's pre-norm wrapper
        self.fn.fn = nn.Module()                             # upstream's rearrange wrapper (registered first there)
        self.fn.fn.fn = MultiHeadAttention(dim, heads, dim_head)
        self.fn.norm = ChannelLayerNorm(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        B, C, T, H, W = x.shape
        h = self.fn.norm(x)
        if self.axis == "time":
            tokens = h.permute(0, 3, 4, 2, 1).reshape(B * H * W, T, C)             # sequences over frames
            out = self.fn.fn.fn(tokens, bias).reshape(B, H, W, T, C).permute(0, 4, 3, 1, 2)
        else:
            tokens = h.permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)             # sequences over locations
            out = self.fn.fn.fn(tokens, bias).reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)
        return x + out


class HeadMixingAttention(nn.Module):
    """The DiT blocks' self-attention, ``forward(x (N, L, C)) -> (N, L, C)``, qkv and output projections with bias.

    Upstream quirk: the attention output (N, heads, L, C/heads) is reshaped to (N, L, C) *without* moving the head
    axis back next to the channels, so output token ℓ holds a slice of the (heads, L, d) block in memory order
    (several tokens of one head) instead of all heads of token ℓ. The released weights were trained through this;
    the usual transpose computes a different function.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"DiT attention: dim {dim} not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, L, C = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, C // self.heads)).permute(2, 0, 3, 1, 4)  # (N, h, L, d)
        out = F.scaled_dot_product_attention(q, k, v)                                 # (N, h, L, d)
        return self.proj(out.reshape(N, L, C))                                        # upstream quirk: no transpose


class Mlp(nn.Module):
    """fc1 → GELU (tanh approximation) → fc2 on (..., C)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN DiT block, ``forward(x (N, L, C), c (N, D)) -> (N, L, C)``: attention and MLP, each on a LayerNorm
    (no affine, eps 1e-6) modulated by shift/scale and gated, from Linear(SiLU(c)) in the order shift, scale, gate
    (attention), shift, scale, gate (MLP)."""

    def __init__(self, dim: int, heads: int, cond_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = HeadMixingAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)  # each (N, 1, C)
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + sh1)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


# ------------------------------------------------------------------------------------------ the network
class OccFmFlowNet(nn.Module):
    """``forward(x (B, 12, C, h, w), t (B,), traj (B, n ≥ trajectory_length, 2) | None) -> v (B, 12, C, h, w)``.

    Upstream layout and units: frames [0, 0, 4 past, 6 noisy] of ×10 latents, t ×1000 (t = 0 noise), trajectory
    rows (dx, dy) in metres (the first ``trajectory_length`` rows are read). Constructor kwargs are upstream's YAML
    keys lower-cased (:func:`~occ_mfd.models.occfm_official.upstream_config.flow_section`); the defaults are the
    released hist config's (``cfm.yaml``; upstream's own constructor has no usable defaults). The fut variant is
    ``trajectory_length=12``.
    """

    def __init__(self, in_channels: int = 16, out_channels: int = 16, model_channels: int = 128,
                 channel_multi: tuple[int, ...] | list[int] = (2, 4), input_size: tuple[int, int] | list[int] = (50, 50),
                 trajectory_length: int = 6, init_kernel_size: int = 7, init_3d_conv_channels: int = 64,
                 attn_dim: int = 32, temporal_attn_head: int = 8, spatial_attn_head: int = 8,
                 traj_fourier_freq: int = 8, name: str | None = None, skip: bool = False):
        super().__init__()
        del name, skip          # upstream's registry name and cache-mode flag: no effect on the network
        channel_multi, input_size = [int(m) for m in channel_multi], [int(s) for s in input_size]
        # What this module was built from (JSON-able), so a snapshot can rebuild it (models/snapshot.py).
        self.init_kwargs = {
            "in_channels": int(in_channels), "out_channels": int(out_channels), "model_channels": int(model_channels),
            "channel_multi": channel_multi, "input_size": input_size, "trajectory_length": int(trajectory_length),
            "init_kernel_size": int(init_kernel_size), "init_3d_conv_channels": int(init_3d_conv_channels),
            "attn_dim": int(attn_dim), "temporal_attn_head": int(temporal_attn_head),
            "spatial_attn_head": int(spatial_attn_head), "traj_fourier_freq": int(traj_fourier_freq)}
        c0, emb = int(init_3d_conv_channels), int(model_channels)
        widths = [m * c0 for m in channel_multi]
        if len(input_size) != 2 or input_size[0] != input_size[1]:
            raise ValueError(f"input_size must be square [s, s] (upstream folds tokens back as s×s), got {input_size}")
        if widths[0] != emb:
            raise ValueError(f"model_channels ({emb}) must equal channel_multi[0]·init_3d_conv_channels ({widths[0]}): "
                             "the position table (model_channels wide) is added to the first level's features")
        if input_size[0] % 2 ** (len(widths) - 1):
            raise ValueError(f"input_size {input_size} must halve exactly {len(widths) - 1} times (stride-2 levels)")
        if init_kernel_size % 2 == 0:
            raise ValueError(f"init_kernel_size must be odd (same-size padding), got {init_kernel_size}")
        self.in_channels, self.out_channels, self.model_channels = int(in_channels), int(out_channels), emb
        self.input_size, self.trajectory_length = input_size, int(trajectory_length)
        self.traj_fourier_freq = int(traj_fourier_freq)

        # Registration order follows upstream's (the level lists first, filled below), so state_dict() lists the
        # keys in the checkpoint's order.
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        self.t_embedder = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.time_rel_pos_bias = T5RelativePositionBias(temporal_attn_head, num_buckets=32, max_distance=16)
        pad = init_kernel_size // 2
        self.init_conv = nn.Conv3d(in_channels, c0, (1, init_kernel_size, init_kernel_size), padding=(0, pad, pad))
        self.init_temporal_attn = AxisAttention(c0, temporal_attn_head, attn_dim, axis="time")

        dims = list(zip([c0, *widths[:-1]], widths))                                # (in, out) per level
        for i, (d_in, d_out) in enumerate(dims):
            last = i == len(dims) - 1
            self.downs.append(nn.ModuleList([
                ResnetBlock(d_in, d_out, emb), ResnetBlock(d_out, d_out, emb),
                DiTBlock(d_out, spatial_attn_head, emb), DiTBlock(d_out, spatial_attn_head, emb),
                nn.Identity(),   # an empty slot upstream: keeps the downsample at index 5 (its key downs.<i>.5)
                nn.Identity() if last else nn.Conv3d(d_out, d_out, (1, 4, 4), (1, 2, 2), (0, 1, 1)),
            ]))
        mid = widths[-1]
        self.mid_block1 = ResnetBlock(mid, mid, emb)
        # Upstream leaves the mid spatial attention at its default 32-wide heads (not attn_dim).
        self.mid_spatial_attn = AxisAttention(mid, spatial_attn_head, 32, axis="space")
        self.mid_temporal_attn = AxisAttention(mid, temporal_attn_head, attn_dim, axis="time")
        self.mid_block2 = ResnetBlock(mid, mid, emb)

        for i, (d_in, d_out) in enumerate(reversed(dims)):
            last = i == len(dims) - 1
            self.ups.append(nn.ModuleList([
                ResnetBlock(2 * d_out, d_in, emb), ResnetBlock(d_in, d_in, emb),      # input: [x ‖ skip]
                DiTBlock(d_in, spatial_attn_head, emb), DiTBlock(d_in, spatial_attn_head, emb),
                nn.Identity() if last else nn.ConvTranspose3d(d_in, d_in, (1, 4, 4), (1, 2, 2), (0, 1, 1)),
            ]))
        self.final_conv = nn.Sequential(ResnetBlock(2 * c0, c0), nn.Conv3d(c0, out_channels, 1))  # [x ‖ stem]

        # Frozen sin-cos tables; Parameters (not buffers) because the checkpoint holds them as such.
        self.pos_embed = nn.Parameter(spatial_pos_table(*input_size, emb)[None], requires_grad=False)
        self.temp_embed = nn.Parameter(frame_table(FRAMES, emb)[None], requires_grad=False)
        self.traj_encoder = nn.Sequential(nn.Linear(self.trajectory_length * self.traj_fourier_freq * 4, emb),
                                          nn.SiLU(), nn.Linear(emb, emb))
        self._init_like_upstream()

    def _init_like_upstream(self) -> None:
        """Upstream's initialisation (only matters when training from scratch; released weights replace it): every
        Linear Xavier-uniform with zero bias, then the time MLP's weights N(0, 0.02²). That pass runs after the DiT
        blocks zeroed their adaLN layers, so upstream's DiT blocks do *not* start as the identity; neither do ours."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for i in (0, 2):
            nn.init.normal_(self.t_embedder[i].weight, std=0.02)

    @classmethod
    def from_upstream_config(cls, cfg: dict) -> "OccFmFlowNet":
        """From an upstream world-model config as read by ``upstream_config.load_upstream_yaml``."""
        return cls(**flow_section(cfg))

    # -------------------------------------------------------------------------------------- helpers
    def condition(self, t: torch.Tensor, traj: torch.Tensor | None) -> torch.Tensor:
        """(B,) t (×1000), (B, n, 2) trajectory or None → (B, model_channels) conditioning vector."""
        emb = self.t_embedder(timestep_features(t, self.model_channels))
        if traj is not None:
            if traj.ndim != 3 or traj.shape[-1] != 2 or traj.shape[1] < self.trajectory_length:
                raise ValueError(f"OccFmFlowNet: traj must be (B, n >= {self.trajectory_length}, 2), "
                                 f"got {tuple(traj.shape)}")
            feats = trajectory_features(traj[:, :self.trajectory_length], self.traj_fourier_freq)
            emb = emb + self.traj_encoder(feats)
        return emb

    @staticmethod
    def _space_time(x: torch.Tensor, emb: torch.Tensor, spatial: DiTBlock, temporal: DiTBlock,
                    pos: torch.Tensor | None = None, frames: torch.Tensor | None = None) -> torch.Tensor:
        """Spatial DiT per frame, then temporal DiT per location, on (B, C, T, H, W); ``pos`` (1, H·W, C) and
        ``frames`` (1, T, C) are added to the tokens first (level 0 only)."""
        B, C, T, H, W = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)                 # (B·T, H·W, C)
        if pos is not None:
            tokens = tokens + pos
        tokens = spatial(tokens, emb.repeat_interleave(T, dim=0))
        tokens = tokens.reshape(B, T, H * W, C).transpose(1, 2).reshape(B * H * W, T, C)   # (B·H·W, T, C)
        if frames is not None:
            tokens = tokens + frames
        tokens = temporal(tokens, emb.repeat_interleave(H * W, dim=0))
        return tokens.reshape(B, H, W, T, C).permute(0, 4, 3, 1, 2)                 # (B, C, T, H, W)

    # -------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, traj: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C, H, W = x.shape
        if (T, C, [H, W]) != (FRAMES, self.in_channels, self.input_size):
            raise ValueError(f"OccFmFlowNet: x {tuple(x.shape)} != (B, {FRAMES}, {self.in_channels}, "
                             f"{self.input_size[0]}, {self.input_size[1]})")
        bias = self.time_rel_pos_bias(T)                                             # (heads, T, T)
        h = self.init_conv(x.transpose(1, 2))                                        # (B, c0, T, H, W)
        # Upstream quirk: the residual attention's output (h + attn) is added to h again: 2h + attn.
        h = h + self.init_temporal_attn(h, bias)
        stem = h
        emb = self.condition(t.expand(B), traj)                                      # (B, D)

        skips = []
        for level, (res1, res2, spatial, temporal, _, down) in enumerate(self.downs):
            h = res2(res1(h, emb), emb)
            tables = (self.pos_embed, self.temp_embed) if level == 0 else (None, None)
            h = self._space_time(h, emb, spatial, temporal, *tables)
            skips.append(h)
            h = down(h)

        h = self.mid_block1(h, emb)
        h = self.mid_spatial_attn(h)
        h = self.mid_temporal_attn(h, bias)
        h = self.mid_block2(h, emb)

        for res1, res2, spatial, temporal, up in self.ups:
            h = torch.cat([h, skips.pop()], dim=1)
            h = res2(res1(h, emb), emb)
            h = up(self._space_time(h, emb, spatial, temporal))

        out = self.final_conv(torch.cat([h, stem], dim=1))                           # (B, C_out, T, H, W)
        return out.transpose(1, 2)
