"""The frozen VAE as a codec between occupancy and the latent space the flow models live in.

- :class:`LatentCodec`: occupancy sequences ↔ *scaled* latents (OccFM multiplies VAE latents by 10).
- :class:`LatentPrepare`: ``prepare(batch) -> (x1, ForecastCond)``, what the flow-matching and distillation
  objectives call on every batch: future latents as the flow's data x1, past latents and ego poses as its
  condition.
"""
from __future__ import annotations

import torch
from torch import nn

from occ_mfd.ego_motion import prior_frames
from occ_mfd.models.forecaster import ForecastCond
from occ_mfd.models.vae import OccVAE


class LatentCodec(nn.Module):
    """Frozen VAE: ``encode(occ (B, T, X, Y, Z)) -> (B, T, C, H, W)`` scaled latents; ``decode_logits`` inverts.

    ``sample=False`` encodes the posterior mean; ``True`` draws μ + σ·ε (as OccFM caches).
    """

    def __init__(self, vae: OccVAE, scale: float = 10.0, sample: bool = False):
        super().__init__()
        self.vae, self.scale, self.sample = vae, float(scale), sample
        self.vae.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # the VAE stays in eval mode whatever the parent does
        super().train(mode)
        self.vae.eval()
        return self

    @torch.no_grad()
    def encode(self, occ: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, T, X, Y, Z) ids → (B, T, C, H, W) scaled latents, float32 even under autocast (latents are flow
        state: the solvers and the time embedding must not see bf16)."""
        B, T = occ.shape[:2]
        dist = self.vae.encode(occ.flatten(0, 1).long())
        z = dist.sample(generator) if self.sample else dist.mean
        return (z.float() * self.scale).unflatten(0, (B, T))

    def condition(self, batch, prior: str | None = None) -> ForecastCond:
        """OccBatch → the forecaster's condition: scaled past latents (B, P, C, H, W), ego poses (B, P+F, 4, 4)
        and, for ``prior`` ∈ :data:`~occ_mfd.ego_motion.PRIORS`, the latents (B, F, C, H, W) of the current frame
        warped to each future frame (the net's ``prior``: see :class:`~occ_mfd.models.forecaster.OccForecaster`).
        """
        prior_latents = None
        if prior is not None:
            if getattr(batch, "grid", None) is None:
                raise ValueError(f"an ego-motion prior ({prior!r}) warps voxels and needs the batch's grid; this "
                                 f"batch has none (OccSequenceDataset sets it; a hand-built OccBatch needs grid=)")
            prior_latents = self.encode(prior_frames(batch.past, batch.ego, batch.grid, prior))
        return ForecastCond(past_latents=self.encode(batch.past), ego=batch.ego.float(), prior_latents=prior_latents)

    @torch.no_grad()
    def decode_logits(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) scaled latents → (B, T, K, X, Y, Z) logits."""
        B, T = latents.shape[:2]
        return self.vae.decode(latents.flatten(0, 1) / self.scale).unflatten(0, (B, T))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) scaled latents → (B, T, X, Y, Z) uint8 class ids (argmax over the classes)."""
        return logits_to_classes(self.decode_logits(latents))


def logits_to_classes(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, K, X, Y, Z) logits → (B, T, X, Y, Z) uint8 ids (first maximum on ties, as ``argmax``)."""
    return logits.argmax(dim=2).to(torch.uint8)


class LatentPrepare(nn.Module):
    """``prepare(batch: OccBatch) -> (x1 (B, F, C, H, W), ForecastCond)``; ``prior``: the net's ego-motion prior.

    An ``nn.Module`` on purpose: an objective that stores it as an attribute (``self.prepare = prepare``)
    registers the frozen VAE as a submodule, so ``objective.to(device)`` moves it and the objective's
    checkpoint is self-contained (the VAE has no trainable parameters, so no optimiser or EMA sees it).
    """

    def __init__(self, codec: LatentCodec, prior: str | None = None):
        super().__init__()
        self.codec, self.prior = codec, prior

    def forward(self, batch):
        return self.codec.encode(batch.future), self.codec.condition(batch, self.prior)
