"""Training objective of the occupancy VAE: every frame of a batch (past + future) is a sample."""
from __future__ import annotations

import torch
from torch import nn

from occ_mfd.engine.objective import LossOutput, Objective
from occ_mfd.grid import FREE_ID, IGNORE, NUM_SEMANTIC
from occ_mfd.models.vae import OccVAE
from occ_mfd.models.vae_loss import VAELoss


@torch.no_grad()
def batch_iou_miou(pred: torch.Tensor, target: torch.Tensor, free_id: int = FREE_ID,
                   num_semantic: int = NUM_SEMANTIC, ignore_index: int = IGNORE) -> tuple[float, float]:
    """Pooled over the batch: IoU of occupied (≠ free) vs free, and mIoU over classes 0..num_semantic-1
    whose union is non-empty (absent classes excluded, not counted as 1). Voxels labelled ignore skipped."""
    keep = target != ignore_index
    p, t = pred[keep], target[keep]
    po, to = p != free_id, t != free_id
    union = (po | to).sum()
    iou = ((po & to).sum() / union).item() if union > 0 else float("nan")
    ious = []
    for c in range(num_semantic):
        pc, tc = p == c, t == c
        u = (pc | tc).sum()
        if u > 0:
            ious.append(((pc & tc).sum() / u).item())
    return iou, (sum(ious) / len(ious) if ious else float("nan"))


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

    def forward(self, batch, phase: str = "main") -> LossOutput:
        frames = torch.cat([batch.past, batch.future], dim=1).flatten(0, 1).long()  # (B·T, X, Y, Z)
        if self.max_frames is not None and frames.shape[0] > self.max_frames:
            frames = frames[torch.randperm(frames.shape[0], device=frames.device)[: self.max_frames]]
        logits, dist = self.vae(frames, sample=True)
        terms = self.loss(logits, frames, dist)
        iou, miou = batch_iou_miou(logits.argmax(dim=1), frames, free_id=self.vae.free_id)
        logs = {"ce": terms.ce, "lovasz": terms.lovasz, "kl": terms.kl, "recon_iou": iou, "recon_miou": miou}
        return LossOutput(terms.total, logs)
