"""VAE training loss: ce_weight·CE + lovasz_weight·Lovász-softmax + kl_weight·KL (OccFM uses 10 / 1 / 1).

KL is averaged over latent elements (not summed), so its weight is independent of the latent size;
the default 1e-3 keeps the posterior informative at our small scales (OccFM's "1" is for its own
reduction, which the paper does not state).

``class_balance=True`` weights the cross-entropy per class by ENet's 1 / ln(1.02 + f_k) (Paszke et al. 2016,
arXiv 1606.02147 §5.2), f_k = the share of class k among the batch's labelled voxels. Why: free space is
~90 % of the voxels and cars, pedestrians and poles well under 1 %, so the plain CE is nearly all about free
space and road; the tokenizer then drops small classes, which caps every forecaster's mIoU (``vae-recon``).
ln(1.02 + f) bounds the weight ratio at 1 / ln 1.02 ≈ 50 (plain inverse frequency would give 10⁴ and make the
rarest voxels dominate). Computed per batch, so no data pass is needed; a class absent from the batch gets
no weight because it has no voxels.
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


def enet_class_weights(target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE,
                       c: float = 1.02) -> torch.Tensor:
    """(num_classes,) weights 1 / ln(c + f_k) from the class shares f_k of ``target``'s labelled voxels."""
    labelled = target[target != ignore_index]
    counts = torch.bincount(labelled.flatten(), minlength=num_classes)[:num_classes].float()
    share = counts / counts.sum().clamp_min(1.0)
    return 1.0 / torch.log(c + share)


class VAELoss(nn.Module):
    def __init__(self, ce_weight: float = 10.0, lovasz_weight: float = 1.0, kl_weight: float = 1e-3,
                 ignore_index: int = IGNORE, class_balance: bool = False):
        super().__init__()
        self.ce_weight, self.lovasz_weight, self.kl_weight = ce_weight, lovasz_weight, kl_weight
        self.ignore_index, self.class_balance = ignore_index, class_balance

    def forward(self, logits: torch.Tensor, target: torch.Tensor, dist: LatentDist) -> VAELossTerms:
        """logits (B, K, X, Y, Z), target (B, X, Y, Z) int64 ids (``ignore_index`` skipped)."""
        weight = (enet_class_weights(target, logits.shape[1], self.ignore_index).to(logits.dtype)
                  if self.class_balance else None)
        # With weights, F.cross_entropy divides by the summed weight of the labelled voxels: a weighted mean.
        ce = F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index)
        lov = lovasz_softmax(logits, target, ignore_index=self.ignore_index) if self.lovasz_weight else ce * 0.0
        kl = dist.kl().mean()
        total = self.ce_weight * ce + self.lovasz_weight * lov + self.kl_weight * kl
        return VAELossTerms(total, ce.detach(), lov.detach(), kl.detach())
