"""Training objective of the occupancy VAE: every frame of a batch (past + future) is a sample."""
from __future__ import annotations

import torch
from torch import nn

from occ_mfd.models.snapshot import InferenceParts
from occ_mfd.models.vae import OccVAE
from occ_mfd.models.vae_loss import VAELoss
from occ_mfd.objectives.base import LossOutput, Objective
from occ_mfd.scores import confusion_matrix, iou_from_confusion


class VAEObjective(Objective):
    """``forward(batch: OccBatch) -> LossOutput``; trains on past+future frames flattened to one batch.

    ``max_frames`` (optional) keeps a random subset of frames per step to bound memory at full scale.
    """

    def __init__(self, vae: OccVAE, loss: VAELoss | None = None, max_frames: int | None = None):
        super().__init__()
        self.vae = vae
        self.loss = loss or VAELoss()
        self.max_frames = max_frames

    def ema_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae}

    def inference_parts(self) -> InferenceParts:
        return InferenceParts("vae", {"vae": self.vae})

    def forward(self, batch, phase: str = "main") -> LossOutput:
        frames = torch.cat([batch.past, batch.future], dim=1).flatten(0, 1).long()  # (B·T, X, Y, Z)
        if self.max_frames is not None and frames.shape[0] > self.max_frames:
            frames = frames[torch.randperm(frames.shape[0], device=frames.device)[: self.max_frames]]
        logits, dist = self.vae(frames, sample=True)
        terms = self.loss(logits, frames, dist)
        # Reconstruction scores pooled over the batch, as fractions (absent classes left out of the mIoU).
        conf = confusion_matrix(logits.argmax(dim=1), frames, self.vae.num_classes)
        iou, _, miou = iou_from_confusion(conf.cpu(), self.vae.free_id)
        logs = {"ce": terms.ce, "lovasz": terms.lovasz, "kl": terms.kl, "recon_iou": iou / 100,
                "recon_miou": miou / 100}
        return LossOutput(terms.total, logs)
