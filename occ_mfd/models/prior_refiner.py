"""The ego-motion prior at the decoder: a small network that corrects the VAE's logits with the warped current frame.

Why (issue "a teacher that forecasts"): a latent forecaster decodes through the VAE, and the tokenizer loses small
classes (the demo's vae-recon mIoU ≈ 47 of the *true* future), while a voxel-space warp of the current frame keeps
every cone and barrier it sees — cv-warp scores 50 mIoU at 0.5 s against 16 for the latent teacher. The warp is
available at inference without any future information (the cv-warp baseline reads only the past poses), so the
decoder may read it too: ``logits' = logits + g(log_softmax(logits), embed(prior))``. The latents say what the
scene becomes (moving agents, newly seen space); the prior supplies the static detail the latents lost. The
forecaster, its velocity contract and every distiller are unchanged: only decoding is.

``g``'s last layer starts at zero, so an untrained refiner returns the VAE's logits exactly (tested), and a refiner
trained on the VAE's latents of the true future must learn *when* to trust the prior: where the scene moved, the
latents disagree with the warp and win.

Shapes: logits (N, K, X, Y, Z), prior (N, X, Y, Z) integer labels; height is folded into channels (as the VAE
folds it), so g is a 2-D conv net on the BEV plane.
"""
from __future__ import annotations

import torch
from torch import nn

from occ_mfd.ego_motion import PRIORS


class PriorRefiner(nn.Module):
    """``forward(logits (N, K, X, Y, Z), prior (N, X, Y, Z)) -> logits (N, K, X, Y, Z)``.

    Args:
        num_classes: K (18 with free space).
        grid_z: Z, voxels per column.
        prior: which ego-motion prior it reads (:data:`~occ_mfd.ego_motion.PRIORS`): "cv-warp" (past poses only;
            for past-conditioned forecasters) or "warp" (the given future poses; planning-conditioned ones).
        hidden: width of g's hidden layers (1×1 → 3×3 → 1×1: a 3×3 conv on the wide folded input would cost more
            than the whole VAE decoder; the one 3×3 layer lets a voxel read its neighbours, which absorbs a warp
            that is off by a voxel).
        class_dim: size of the prior's per-voxel class embedding.
    """

    def __init__(self, num_classes: int = 18, grid_z: int = 16, prior: str = "cv-warp", hidden: int = 32,
                 class_dim: int = 8):
        init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.init_kwargs = init_kwargs
        if prior not in PRIORS:
            raise ValueError(f"PriorRefiner: prior must be one of {PRIORS}, got {prior!r}")
        self.num_classes, self.grid_z, self.prior = num_classes, grid_z, prior
        self.prior_embed = nn.Embedding(num_classes, class_dim)
        in_ch = grid_z * (num_classes + class_dim)
        self.net = nn.Sequential(nn.Conv2d(in_ch, hidden, 1), nn.SiLU(),
                                 nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(hidden, grid_z * num_classes, 1))
        nn.init.zeros_(self.net[-1].weight)     # starts as the identity on the VAE's logits
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        N, K, X, Y, Z = logits.shape
        if K != self.num_classes or Z != self.grid_z or prior.shape != (N, X, Y, Z):
            raise ValueError(f"PriorRefiner: logits {tuple(logits.shape)} and prior {tuple(prior.shape)} must be "
                             f"(N, {self.num_classes}, X, Y, {self.grid_z}) and (N, X, Y, {self.grid_z})")
        # log-probabilities, not raw logits: their scale is fixed (≤ 0), so g sees comparable inputs from any VAE.
        lp = logits.log_softmax(1).permute(0, 1, 4, 2, 3).flatten(1, 2)               # (N, K·Z, X, Y)
        pe = self.prior_embed(prior.long()).permute(0, 4, 3, 1, 2).flatten(1, 2)      # (N, c·Z, X, Y)
        delta = self.net(torch.cat([lp.to(pe.dtype), pe], dim=1))                     # (N, K·Z, X, Y)
        return logits + delta.view(N, K, Z, X, Y).permute(0, 1, 3, 4, 2).to(logits.dtype)
