"""Per-frame occupancy VAE (OccFM's tokenizer, arXiv 2506.23434 §3.1), conv version.

(X, Y, Z) class ids → class embedding (``class_dim``) ‖ fixed sin/cos height embedding (``height_dim``)
per voxel → heights folded into channels on the BEV plane (Z·(class_dim+height_dim)) → 2-D conv encoder
with ``log2(downsample)`` stride-2 stages → μ, log σ² of a (latent_channels, X/ds, Y/ds) latent →
mirrored decoder to (Z·class_dim, X, Y) → logits = dot product of each voxel's feature with the class
embeddings (weight tying, as OccFM).

Deviation from OccFM: residual conv blocks instead of Swin stages (enough at our scale, no windowing
constraints on odd sizes). Optional ``stem3d_channels``: a first stage over occupied voxels only
(:class:`~occ_mfd.models.sparse.OccupiedStem3d`, spconv or its dense equivalent, ``sparse`` switch),
halving Z before the fold.

Sizes (measured): full ``OccVAE(grid_z=16, channels=(128, 256, 512), latent_channels=16, downsample=4)``
= 15.94 M parameters (200×200×16 → 16×50×50), 15.87 M with ``stem3d_channels=16`` (configs/nuscenes/vae.py);
tiny ``OccVAE(grid_z=8, channels=(32, 64, 64), latent_channels=8, downsample=4)`` = 0.505 M (100×100×8 →
8×25×25; no stem: on 2 CPU cores the spconv stem is not faster, see benchmarks/sparse_stem.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from occ_mfd.grid import FREE_ID, NUM_CLASSES
from occ_mfd.models.embeddings import height_embedding
from occ_mfd.models.sparse import OccupiedStem3d
from occ_mfd.models.vae_blocks import Downsample2d, ResBlock2d, Upsample2d, group_norm


@dataclass
class LatentDist:
    """Diagonal Gaussian posterior. mean, logvar: (B, C, H, W)."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        gdev = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=gdev, dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * eps

    def kl(self) -> torch.Tensor:
        """(B, C, H, W) KL(q || N(0, I)) per element (Kingma & Welling 2014, App. B)."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar)


class OccVAE(nn.Module):
    """Occupancy VAE. ``encode(occ (B, X, Y, Z) int64) -> LatentDist``; ``decode(z) -> (B, K, X, Y, Z)`` logits."""

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        grid_z: int = 16,
        class_dim: int = 8,
        height_dim: int = 4,
        channels: tuple[int, ...] = (128, 256, 512),
        num_res_blocks: int = 1,
        latent_channels: int = 16,
        downsample: int = 4,
        stem3d_channels: int = 0,
        sparse: bool | str = "auto",
        free_id: int = FREE_ID,
    ):
        # The constructor arguments, so an inference snapshot can rebuild this network (models/snapshot.py).
        init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.init_kwargs = init_kwargs
        n_down = int(round(math.log2(downsample)))
        if 2**n_down != downsample or n_down > len(channels) - 1:
            raise ValueError(f"OccVAE: downsample={downsample} must be 2^k with k < len(channels)={len(channels)}")
        self.num_classes, self.grid_z, self.class_dim = num_classes, grid_z, class_dim
        self.latent_channels, self.downsample, self.free_id = latent_channels, downsample, free_id
        self.class_embed = nn.Embedding(num_classes, class_dim)
        self.register_buffer("height_embed", height_embedding(grid_z, height_dim), persistent=False)  # (Z, h)
        voxel_dim = class_dim + height_dim
        if stem3d_channels:
            self.stem3d = OccupiedStem3d(voxel_dim, stem3d_channels, z_stride=2, sparse=sparse)
            fold_ch = (grid_z // 2) * stem3d_channels
        else:
            self.stem3d = None
            fold_ch = grid_z * voxel_dim
        chs = list(channels[: n_down + 1])
        # Encoder: fold → conv → [res blocks, down] per level → μ, log σ².
        self.enc_in = nn.Conv2d(fold_ch, chs[0], 3, padding=1)
        enc = []
        for i, ch in enumerate(chs):
            enc += [ResBlock2d(ch, ch) for _ in range(num_res_blocks)]
            if i < n_down:
                enc.append(Downsample2d(ch, chs[i + 1]))
        self.enc_blocks = nn.Sequential(*enc)
        self.enc_out = nn.Sequential(group_norm(chs[-1]), nn.SiLU(), nn.Conv2d(chs[-1], 2 * latent_channels, 3, padding=1))
        # Decoder mirrors it.
        self.dec_in = nn.Conv2d(latent_channels, chs[-1], 3, padding=1)
        self.dec_levels = nn.ModuleList()
        for i in reversed(range(len(chs))):
            blocks = nn.ModuleList([ResBlock2d(chs[i], chs[i]) for _ in range(num_res_blocks)])
            up = Upsample2d(chs[i], chs[i - 1]) if i > 0 else None
            self.dec_levels.append(nn.ModuleDict({"blocks": blocks, **({"up": up} if up else {})}))
        self.dec_out = nn.Sequential(group_norm(chs[0]), nn.SiLU(), nn.Conv2d(chs[0], grid_z * class_dim, 3, padding=1))

    def voxel_features(self, occ: torch.Tensor) -> torch.Tensor:
        """(B, X, Y, Z) ids → (B, X, Y, Z, class_dim + height_dim) per-voxel input features."""
        B, X, Y, Z = occ.shape
        cls = self.class_embed(occ)                                             # (B, X, Y, Z, c)
        hgt = self.height_embed.to(cls.dtype).expand(B, X, Y, Z, -1)            # (B, X, Y, Z, h)
        return torch.cat([cls, hgt], dim=-1)

    def encode(self, occ: torch.Tensor) -> LatentDist:
        if occ.ndim != 4 or occ.shape[-1] != self.grid_z:
            raise ValueError(f"OccVAE.encode: expected (B, X, Y, {self.grid_z}) ids, got {tuple(occ.shape)}")
        X, Y = occ.shape[1:3]
        if X % self.downsample or Y % self.downsample:
            raise ValueError(f"OccVAE.encode: X, Y = {X}, {Y} must be divisible by downsample={self.downsample}")
        feats = self.voxel_features(occ.long())                                 # (B, X, Y, Z, D)
        if self.stem3d is not None:
            h = self.stem3d(feats, occ != self.free_id)                         # (B, C3, X, Y, Z/2)
            h = h.permute(0, 4, 1, 2, 3)                                        # (B, Z/2, C3, X, Y)
        else:
            h = feats.permute(0, 3, 4, 1, 2)                                    # (B, Z, D, X, Y)
        h = h.flatten(1, 2)                                                     # (B, Z·D, X, Y): height → channels
        h = self.enc_out(self.enc_blocks(self.enc_in(h)))                       # (B, 2C, X/ds, Y/ds)
        mean, logvar = h.chunk(2, dim=1)
        return LatentDist(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dec_in(z)
        for level in self.dec_levels:
            for blk in level["blocks"]:
                h = blk(h)
            if "up" in level:
                h = level["up"](h)
        h = self.dec_out(h)                                                     # (B, Z·c, X, Y)
        B, _, X, Y = h.shape
        h = h.view(B, self.grid_z, self.class_dim, X, Y)
        # logits[b, k, x, y, z] = <feature(b, x, y, z), class_embed[k]>
        return torch.einsum("bzcxy,kc->bkxyz", h, self.class_embed.weight)

    def forward(self, occ: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """→ (logits (B, K, X, Y, Z), LatentDist)."""
        dist = self.encode(occ)
        z = dist.sample(generator) if sample else dist.mean
        return self.decode(z), dist
