"""The released OccFM occupancy VAE (``vae_swin_x16_h16``), our implementation with the upstream key names.

Pipeline (full size, PORT.md §1.1): occupancy ids (B, 200, 200, 16) → per voxel [class embedding (8) ‖ fixed
height embedding (4)] → heights folded into channels, channel = z·12 + feature (192) → 3×3 conv to 128 →
1×1 patch embed + LayerNorm + learned absolute positions → [Swin-V2 stage, residual conv, stride-2 conv
doubling the width] × 2 (200² → 100² → 50²) → conv to width/4 → [residual conv, attention, residual conv]
→ GN · SiLU · conv → μ ‖ log σ² (16 + 16 channels at 50²). The decoder goes 16 → 128 (width fixed), [residual
conv, attention, residual conv], then [Swin-V2 stage, residual conv, nearest ×2 + conv] × 2 → GN · SiLU ·
conv to 128 = 16 heights × 8 features, and the class logits are each voxel's 8 features dotted with the
(detached) class embeddings, as in :class:`occ_mfd.models.vae.OccVAE`.

Constructor kwargs are the upstream YAML sections lower-cased (``upstream_config.vae_sections``), so a
checkpoint's own YAML builds the matching network; keys that do not change the network (``name``,
``out_dim`` of the encoder, ``use_checkpoints``, …) are accepted and ignored, and an absent key takes the
upstream constructor's default. Behaviour that changes outputs and is reproduced on purpose:

- height embedding ``[sin(kπh), cos(kπh)]`` for k = 0, 1, … (so its first two columns are the constants 0
  and 1), h = (z·vz + vz/2) / (z_max − z_min), stored as a frozen Parameter (it is in the checkpoints);
- GroupNorm with 32 groups, or ``C // 4`` groups when C ≤ 32, eps 1e-6; LayerNorm eps 1e-5;
- the residual conv block is conv → GN → SiLU → conv, *then* + x (no norm before the first conv);
- attention blocks always have 8 heads of 64 (an inner width of 512 whatever the block width), no biases;
- no clamp on log σ² (the conv output is used as it is).

Only what the released configs use is supported (``downsample: conv``, ``upsample: interp``, no temporal blocks,
no dropout); anything else raises ValueError. A single string for ``downsample``/``upsample`` applies to every
stage (upstream indexes it per character and fails). SiLU is written ``x·sigmoid(x)`` and tokens are made
contiguous where upstream's rearranges copy, so that fp32 results round as upstream's do: with the goldens'
weights our encoder is then bit-identical, and the remaining ≤ 6e-6 on the logits comes from SDPA.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from occ_mfd.grid import FREE_ID
from occ_mfd.models.occfm_official.swin_v2 import SwinV2Stage, effective_window
from occ_mfd.models.occfm_official.upstream_config import vae_sections
from occ_mfd.models.vae import LatentDist

#: Heads × width of the attention blocks (fixed in the released architecture).
ATTN_HEADS, ATTN_HEAD_DIM = 8, 64

# Upstream constructor defaults of the encoder (SwinSingleFrameDownV2) and decoder (SwinSingleFrameUpV2).
ENCODER_DEFAULTS: dict[str, Any] = dict(img_size=800, patch_size=4, input_channel=3, patch_embed_dim=96, window_size=5,
                                        heads=8, depth=None, mlp_ratio=4, qkv_bias=True, attn_drop_rate=0,
                                        drop_rate=0, latent_dim=8, downsample="conv", temporal_block=False)
DECODER_DEFAULTS: dict[str, Any] = dict(input_channel=3, patch_embed_dim=96, window_size=5, heads=8, out_dim=None,
                                        depth=None, mlp_ratio=4, qkv_bias=True, attn_drop_rate=0, drop_rate=0,
                                        upsample="conv", patched_size=50, temporal_block=False)
EMBEDDING_REQUIRED = ("num_cate", "feat_dim", "height_num", "occ_range", "voxel_size", "encoder_dim")


def group_norm(ch: int) -> nn.GroupNorm:
    """The released models' GroupNorm: 32 groups, or ``ch // 4`` for narrow maps (ch ≤ 32); eps 1e-6."""
    return nn.GroupNorm(ch // 4 if ch <= 32 else 32, ch, eps=1e-6)


def occfm_height_embedding(height_num: int, dim: int, occ_range, voxel_size) -> torch.Tensor:
    """(height_num, dim) float32: row z = [sin(0), cos(0), sin(πh), cos(πh), sin(2πh), …], h = normalised
    voxel-centre height (z·vz + vz/2) / (z_max − z_min). Computed in float64, rounded once to float32."""
    if dim % 2:
        raise ValueError(f"height embedding: dim must be even, got {dim}")
    vz = float(voxel_size[-1])
    h = (torch.arange(height_num, dtype=torch.float64) * vz + vz / 2) / (float(occ_range[5]) - float(occ_range[2]))
    ang = h[:, None] * torch.arange(dim // 2, dtype=torch.float64) * math.pi   # (Z, dim/2): k·π·h
    return torch.stack([torch.sin(ang), torch.cos(ang)], dim=-1).flatten(1).float()  # interleaved sin, cos


def _as_list(value, n: int, what: str) -> list:
    """A per-stage option: a list of ``n`` entries, or one value for every stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"OccFmVAE: {what} has {len(value)} entries for {n} stages")
        return list(value)
    return [value] * n


def _check_supported(where: str, kw: dict) -> None:
    if kw.get("temporal_block"):
        raise ValueError(f"OccFmVAE {where}: temporal_block is not ported (the released VAE has none)")
    if kw.get("drop_rate") or kw.get("attn_drop_rate"):
        raise ValueError(f"OccFmVAE {where}: dropout is not ported (the released VAE uses none)")


def _silu(x: torch.Tensor) -> torch.Tensor:
    """x·sigmoid(x), written out as in the released code (``F.silu`` rounds differently in the last bit)."""
    return x * torch.sigmoid(x)


def _tokens_to_map(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, side², C) → (B, C, side, side)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def _map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H·W, C), contiguous (as upstream's rearrange: the GEMMs that follow round the same)."""
    return x.flatten(2).transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------- blocks
class ResConv(nn.Module):
    """conv3 → GN → SiLU → conv3, + x (upstream's residual conv: post-conv norm, no norm on the input)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm = group_norm(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C, H, W)."""
        return x + self.conv2(_silu(self.norm(self.conv1(x))))


class _HeadsAttention(nn.Module):
    """Multi-head self-attention over tokens, 8 heads × 64, no biases; exact softmax via SDPA."""

    def __init__(self, dim: int):
        super().__init__()
        inner = ATTN_HEADS * ATTN_HEAD_DIM
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)   # [k ‖ v], heads-major inside each
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) → (B, N, C)."""
        B, N, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:          # (B, N, 512) → (B, 8, N, 64)
            return t.view(B, N, ATTN_HEADS, ATTN_HEAD_DIM).transpose(1, 2)

        k, v = self.to_kv(x).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(heads(self.to_q(x)), heads(k), heads(v))  # scale 64^-½
        return self.to_out(out.transpose(1, 2).reshape(B, N, ATTN_HEADS * ATTN_HEAD_DIM))


class AttnBlock(nn.Module):
    """x + proj_out(attention(GN(x))) over all positions of a (B, C, H, W) map."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.attention = _HeadsAttention(ch)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.attention(_map_to_tokens(self.norm(x)))     # (B, H·W, C)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → tokens, then LayerNorm: (B, C_in, X, Y) → (B, (X/p)·(Y/p), C)."""

    def __init__(self, in_ch: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_map_to_tokens(self.proj(x)))


class Upsample(nn.Module):
    """Nearest ×2, then 3×3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ----------------------------------------------------------------------------------------- the three parts
class HeightSemEmbed(nn.Module):
    """Occupancy ids → BEV features: [class embedding ‖ height embedding] per voxel, heights folded into
    channels (channel = z·(feat + feat/2) + feature), then a 3×3 conv.  Upstream: ``VoxelHeightSemEmbed``."""

    def __init__(self, num_cate: int, feat_dim: int, height_num: int, occ_range, voxel_size, encoder_dim: int):
        super().__init__()
        if feat_dim % 4:
            raise ValueError(f"OccFmVAE embedding: feat_dim must be a multiple of 4, got {feat_dim}")
        self.height_num, self.feat_dim = height_num, feat_dim
        self.height_embedding = nn.Parameter(
            occfm_height_embedding(height_num, feat_dim // 2, occ_range, voxel_size), requires_grad=False)
        self.class_embeds = nn.Embedding(num_cate, feat_dim)
        # Upstream hard-codes 192 = 16 heights × (8 + 4) input channels; we derive it (same value there).
        fold = height_num * (feat_dim + feat_dim // 2)
        self.pre_pillar_feature = nn.Sequential(nn.Conv2d(fold, encoder_dim, 3, padding=1))

    def forward(self, occ: torch.Tensor) -> torch.Tensor:
        """occ (B, X, Y, Z) ids → (B, encoder_dim, X, Y)."""
        B, X, Y, Z = occ.shape
        cls = self.class_embeds(occ.long())                                  # (B, X, Y, Z, f)
        hgt = self.height_embedding.to(cls.dtype).expand(B, X, Y, Z, -1)     # (B, X, Y, Z, f/2)
        vox = torch.cat([cls, hgt], dim=-1)                                  # (B, X, Y, Z, 3f/2)
        fold = vox.permute(0, 3, 4, 1, 2).reshape(B, -1, X, Y)               # (B, Z·3f/2, X, Y): z outer
        return self.pre_pillar_feature(fold)


class SwinEncoder(nn.Module):
    """BEV features (B, C, X, Y) → μ ‖ log σ² (B, 2·latent_dim, X/ds, Y/ds).  Upstream: ``SwinSingleFrameDownV2``."""

    def __init__(self, img_size: int, patch_size: int, input_channel: int, patch_embed_dim: int, window_size: int,
                 heads: int, depth, mlp_ratio: float, qkv_bias: bool, latent_dim: int, downsample):
        super().__init__()
        if not depth:
            raise ValueError("OccFmVAE encoder: depth (blocks per Swin stage) is required")
        if input_channel != patch_embed_dim:
            # the learned positions have input_channel channels and are added to patch_embed_dim-wide tokens
            raise ValueError(f"OccFmVAE encoder: input_channel {input_channel} must equal patch_embed_dim "
                             f"{patch_embed_dim}")
        for d in _as_list(downsample, len(depth), "encoder downsample"):
            if d != "conv":
                raise ValueError(f"OccFmVAE encoder: downsample {d!r} is not supported (only 'conv')")
        self.img_size, self.patch_size = img_size, patch_size
        side, dim = img_size // patch_size, patch_embed_dim
        self.patch_embed_layer = PatchEmbed(input_channel, dim, patch_size)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, side * side, input_channel))  # learned, zero init
        self.sides: list[int] = []                            # map side at each Swin stage
        self.net_blocks = nn.ModuleList()                     # [Swin stage, residual conv] per stage
        self.downsample_blocks = nn.ModuleList()
        for i, n in enumerate(depth):
            win, _ = effective_window((side, side), window_size, 0)
            if side % win or (i > 0 and self.sides[-1] % 2):
                raise ValueError(f"OccFmVAE encoder: stage {i} map side {side} does not fit windows of {win} "
                                 f"(img_size {img_size}, patch_size {patch_size})")
            self.sides.append(side)
            self.net_blocks.append(SwinV2Stage(dim, (side, side), int(n), heads, window_size, mlp_ratio, qkv_bias))
            self.net_blocks.append(ResConv(dim))
            self.downsample_blocks.append(nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1))
            side, dim = side // 2, dim * 2
        self.latent_side = (self.sides[-1] + 1) // 2          # the last stride-2 conv rounds up
        self.conv_reduce = nn.Conv2d(dim, dim // 4, 3, padding=1)
        dim //= 4
        self.mid = nn.ModuleList([ResConv(dim), AttnBlock(dim), ResConv(dim)])
        self.norm_out = group_norm(dim)
        self.conv_out = nn.Conv2d(dim, 2 * latent_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y) → (B, 2·latent_dim, X/ds, Y/ds)."""
        x = self.patch_embed_layer(x) + self.absolute_pos_embed                # (B, L, C)
        for i, side in enumerate(self.sides):
            swin, res = self.net_blocks[2 * i], self.net_blocks[2 * i + 1]
            x = _tokens_to_map(swin(x), side)                                  # (B, C, side, side)
            x = self.downsample_blocks[i](res(x))                              # (B, 2C, side/2, side/2)
            if i < len(self.sides) - 1:
                x = _map_to_tokens(x)
        x = self.conv_reduce(x)                                                # (B, C/4, h, w)
        for blk in self.mid:
            x = blk(x)
        return self.conv_out(_silu(self.norm_out(x)))


class SwinDecoder(nn.Module):
    """Latent (B, input_channel, P, P) → features (B, out_dim, P·2^n, P·2^n).  Upstream: ``SwinSingleFrameUpV2``."""

    def __init__(self, input_channel: int, patch_embed_dim: int, window_size: int, heads: int, out_dim, depth,
                 mlp_ratio: float, qkv_bias: bool, upsample, patched_size: int):
        super().__init__()
        if not depth:
            raise ValueError("OccFmVAE decoder: depth (blocks per Swin stage) is required")
        if out_dim != patch_embed_dim:
            # the output GroupNorm and conv have out_dim channels and act on the patch_embed_dim-wide map
            raise ValueError(f"OccFmVAE decoder: out_dim {out_dim} must equal patch_embed_dim {patch_embed_dim}")
        for u in _as_list(upsample, len(depth), "decoder upsample"):
            if u != "interp":
                raise ValueError(f"OccFmVAE decoder: upsample {u!r} is not supported (only 'interp')")
        dim, side = patch_embed_dim, patched_size
        self.input_channel, self.patched_size = input_channel, patched_size
        self.sides: list[int] = []
        self.net_blocks = nn.ModuleList()                     # [Swin stage, residual conv] per stage
        self.upsample_blocks = nn.ModuleList()
        for i, n in enumerate(depth):
            win, _ = effective_window((side, side), window_size, 0)
            if side % win:
                raise ValueError(f"OccFmVAE decoder: stage {i} map side {side} does not fit windows of {win} "
                                 f"(patched_size {patched_size})")
            self.sides.append(side)
            self.net_blocks.append(SwinV2Stage(dim, (side, side), int(n), heads, window_size, mlp_ratio, qkv_bias))
            self.net_blocks.append(ResConv(dim))
            self.upsample_blocks.append(Upsample(dim))
            side *= 2
        self.out_side = side
        self.mid = nn.ModuleList([ResConv(dim), AttnBlock(dim), ResConv(dim)])
        self.conv_in = nn.Conv2d(input_channel, dim, 3, padding=1)
        self.norm_out = group_norm(out_dim)
        self.conv_out = nn.Conv2d(out_dim, out_dim, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, input_channel, P, P) → (B, out_dim, P·2^n, P·2^n)."""
        x = self.conv_in(z)
        for blk in self.mid:
            x = blk(x)
        for i, side in enumerate(self.sides):
            swin, res = self.net_blocks[2 * i], self.net_blocks[2 * i + 1]
            x = res(_tokens_to_map(swin(_map_to_tokens(x)), side))             # (B, C, side, side)
            x = self.upsample_blocks[i](x)                                     # (B, C, 2·side, 2·side)
        return self.conv_out(_silu(self.norm_out(x)))


# -------------------------------------------------------------------------------------------------- VAE
class OccFmVAE(nn.Module):
    """The released OccFM VAE with :class:`occ_mfd.models.vae.OccVAE`'s interface.

    ``encode(occ (B, X, Y, Z) ids) -> LatentDist`` (μ, log σ² of (B, 16, X/4, Y/4) at full size);
    ``decode(z) -> (B, num_classes, X, Y, Z)`` logits; ``forward(occ, sample, generator) -> (logits, dist)``.
    ``state_dict`` keys are those of the upstream checkpoints (``embedding.``, ``encoder.``, ``decoder.``).
    """

    def __init__(self, embedding: dict, encoder: dict, decoder: dict):
        super().__init__()
        # JSON-able constructor args, so a snapshot can rebuild this network (models/snapshot.py).
        self.init_kwargs = {"embedding": copy.deepcopy(dict(embedding)), "encoder": copy.deepcopy(dict(encoder)),
                            "decoder": copy.deepcopy(dict(decoder))}
        missing = [k for k in EMBEDDING_REQUIRED if k not in embedding]
        if missing:
            raise ValueError(f"OccFmVAE: embedding section lacks {missing} (upstream has no defaults for them)")
        enc = {**ENCODER_DEFAULTS, **encoder}
        dec = {**DECODER_DEFAULTS, **decoder}
        _check_supported("encoder", enc)
        _check_supported("decoder", dec)
        emb = {k: embedding[k] for k in EMBEDDING_REQUIRED}
        if emb["encoder_dim"] != enc["input_channel"]:
            raise ValueError(f"OccFmVAE: embedding encoder_dim {emb['encoder_dim']} != encoder input_channel "
                             f"{enc['input_channel']}")
        if dec["input_channel"] != enc["latent_dim"]:
            raise ValueError(f"OccFmVAE: decoder input_channel {dec['input_channel']} != encoder latent_dim "
                             f"{enc['latent_dim']}")
        if dec["out_dim"] != emb["height_num"] * emb["feat_dim"]:
            raise ValueError(f"OccFmVAE: decoder out_dim {dec['out_dim']} must be height_num × feat_dim = "
                             f"{emb['height_num'] * emb['feat_dim']} (one feature vector per voxel)")

        self.embedding = HeightSemEmbed(**emb)
        self.encoder = SwinEncoder(**{k: enc[k] for k in (
            "img_size", "patch_size", "input_channel", "patch_embed_dim", "window_size", "heads", "depth",
            "mlp_ratio", "qkv_bias", "latent_dim", "downsample")})
        self.decoder = SwinDecoder(**{k: dec[k] for k in (
            "input_channel", "patch_embed_dim", "window_size", "heads", "out_dim", "depth", "mlp_ratio",
            "qkv_bias", "upsample", "patched_size")})

        self.num_classes = int(emb["num_cate"])
        self.grid_z = int(emb["height_num"])
        self.class_dim = int(emb["feat_dim"])
        self.latent_channels = int(enc["latent_dim"])
        self.downsample = int(enc["patch_size"]) * 2 ** len(enc["depth"])
        self.free_id = FREE_ID

    @classmethod
    def from_upstream_config(cls, cfg: dict) -> OccFmVAE:
        """Build from an upstream YAML as read by ``upstream_config.load_upstream_yaml`` (VAE or world model)."""
        return cls(**vae_sections(cfg))

    def encode(self, occ: torch.Tensor) -> LatentDist:
        """occ (B, X, Y, Z) class ids → posterior with mean, logvar (B, latent, X/ds, Y/ds); logvar unclamped."""
        side = self.encoder.img_size
        if occ.ndim != 4 or tuple(occ.shape[1:]) != (side, side, self.grid_z):
            raise ValueError(f"OccFmVAE.encode: expected (B, {side}, {side}, {self.grid_z}) class ids, "
                             f"got {tuple(occ.shape)}")
        h = self.encoder(self.embedding(occ))                                  # (B, 2·latent, h, w)
        mean, logvar = h.chunk(2, dim=1)
        return LatentDist(mean, logvar)

    def decode_features(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent, P, P) → (B, Z, class_dim, X, Y) per-voxel features (decoder channel = z·class_dim + c)."""
        P = self.decoder.patched_size
        if z.ndim != 4 or tuple(z.shape[1:]) != (self.decoder.input_channel, P, P):
            raise ValueError(f"OccFmVAE.decode: expected latents (B, {self.decoder.input_channel}, {P}, {P}), "
                             f"got {tuple(z.shape)}")
        h = self.decoder(z)                                                    # (B, Z·c, X, Y)
        B, _, X, Y = h.shape
        return h.view(B, self.grid_z, self.class_dim, X, Y)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent, P, P) → logits (B, num_classes, X, Y, Z)."""
        h = self.decode_features(z)
        # logits[b, k, x, y, z] = <feature(b, x, y, z), class_embed[k]>; detached as upstream, so the
        # reconstruction loss does not move the class embeddings through the decoder side.
        return torch.einsum("bzcxy,kc->bkxyz", h, self.embedding.class_embeds.weight.detach())

    def forward(self, occ: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """→ (logits (B, K, X, Y, Z), LatentDist)."""
        dist = self.encode(occ)
        z = dist.sample(generator) if sample else dist.mean
        return self.decode(z), dist
