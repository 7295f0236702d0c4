"""VAE training loss: ce_weight·CE + lovasz_weight·Lovász-softmax + kl_weight·KL (OccFM uses 10 / 1 / 1).

KL is averaged over latent elements (not summed), so its weight is independent of the latent size;
the default 1e-3 keeps the posterior informative at our small scales (OccFM's "1" is for its own
reduction, which the paper does not state).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from occ_mfd.grid import IGNORE
from occ_mfd.models.lovasz import lovasz_softmax
from occ_mfd.models.vae import LatentDist


@dataclass
class VAELossTerms:
    """Scalars: total (weighted sum), ce, lovasz, kl (unweighted)."""

    total: torch.Tensor
    ce: torch.Tensor
    lovasz: torch.Tensor
    kl: torch.Tensor


class VAELoss(nn.Module):
    def __init__(self, ce_weight: float = 10.0, lovasz_weight: float = 1.0, kl_weight: float = 1e-3,
                 ignore_index: int = IGNORE):
        super().__init__()
        self.ce_weight, self.lovasz_weight, self.kl_weight = ce_weight, lovasz_weight, kl_weight
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor, dist: LatentDist) -> VAELossTerms:
        """logits (B, K, X, Y, Z), target (B, X, Y, Z) int64 ids (``ignore_index`` skipped)."""
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        lov = lovasz_softmax(logits, target, ignore_index=self.ignore_index) if self.lovasz_weight else ce * 0.0
        kl = dist.kl().mean()
        total = self.ce_weight * ce + self.lovasz_weight * lov + self.kl_weight * kl
        return VAELossTerms(total, ce.detach(), lov.detach(), kl.detach())
