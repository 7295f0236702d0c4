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
from occ_mfd.models.latent_cache import LatentCache
from occ_mfd.models.prior_refiner import PriorRefiner
from occ_mfd.models.vae import OccVAE


class LatentCodec(nn.Module):
    """Frozen VAE: ``encode(occ (B, T, X, Y, Z)) -> (B, T, C, H, W)`` scaled latents; ``decode_logits`` inverts.

    ``sample=False`` encodes the posterior mean; ``True`` draws μ + σ·ε (as OccFM caches). ``cache_mb`` > 0
    (training stages; mean encoding only) keeps the latents of the frames it has encoded in a
    :class:`~occ_mfd.models.latent_cache.LatentCache`, keyed by the batch's scene and sample tokens.
    ``refiner`` (a :class:`~occ_mfd.models.prior_refiner.PriorRefiner`, or None): the decoder then also reads the
    ego-motion prior's voxels (``decode_logits(latents, prior)``; :meth:`decode_prior` makes them from a batch).
    """

    def __init__(self, vae: OccVAE, scale: float = 10.0, sample: bool = False, cache_mb: float = 0.0,
                 refiner: PriorRefiner | None = None):
        super().__init__()
        self.vae, self.scale, self.sample, self.refiner = vae, float(scale), sample, refiner
        self.vae.eval().requires_grad_(False)
        if refiner is not None:
            refiner.eval().requires_grad_(False)
        if cache_mb and sample:
            raise ValueError("LatentCodec: a latent cache needs deterministic (posterior-mean) encoding, sample=False")
        self.cache = LatentCache(cache_mb) if cache_mb else None

    def train(self, mode: bool = True):  # the VAE stays in eval mode whatever the parent does
        super().train(mode)
        self.vae.eval()
        if self.refiner is not None:
            self.refiner.eval()
        return self

    def networks(self) -> dict[str, nn.Module]:
        """The codec's networks by snapshot name: ``vae``, and ``refiner`` when it has one (what every stage built
        on this codec stores in its inference snapshot, :meth:`models.snapshot.Snapshot.codec` rebuilds)."""
        return {"vae": self.vae, **({"refiner": self.refiner} if self.refiner is not None else {})}

    def decode_prior(self, batch) -> torch.Tensor | None:
        """(B, F, X, Y, Z) voxels of the ego-motion prior the refiner reads (None without a refiner)."""
        if self.refiner is None:
            return None
        if getattr(batch, "grid", None) is None:
            raise ValueError("a decoder that reads the ego-motion prior warps voxels and needs the batch's grid")
        return prior_frames(batch.past, batch.ego, batch.grid, self.refiner.prior)

    @torch.no_grad()
    def encode(self, occ: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, T, X, Y, Z) ids → (B, T, C, H, W) scaled latents, float32 even under autocast (latents are flow
        state: the solvers and the time embedding must not see bf16)."""
        B, T = occ.shape[:2]
        dist = self.vae.encode(occ.flatten(0, 1).long())
        z = dist.sample(generator) if self.sample else dist.mean
        return (z.float() * self.scale).unflatten(0, (B, T))

    @staticmethod
    def _names_frames(batch) -> bool:
        """Whether every sample of ``batch`` names its P + F frames (scene + tokens): the cache's keys."""
        tokens, scenes = getattr(batch, "tokens", None), getattr(batch, "scenes", None)
        T = batch.ego.shape[1]
        return bool(tokens) and bool(scenes) and len(tokens) == len(scenes) == batch.past.shape[0] \
            and all(len(t) == T for t in tokens)

    def encode_part(self, batch, part: str) -> torch.Tensor:
        """``batch.past`` or ``batch.future`` → (B, T, C, H, W) scaled latents, through the cache when there is one
        and the batch names its frames."""
        occ = getattr(batch, part)
        if self.cache is None or not self._names_frames(batch):
            return self.encode(occ)
        B, T = occ.shape[:2]
        first = 0 if part == "past" else batch.past.shape[1]
        keys = [(batch.scenes[b], batch.tokens[b][first + t]) for b in range(B) for t in range(T)]
        flat = occ.flatten(0, 1)                                                    # (B·T, X, Y, Z)
        return self.cache.fetch(keys, lambda idx: self.encode(flat[idx][:, None])[:, 0]).unflatten(0, (B, T))

    def prior_latents(self, batch, prior: str) -> torch.Tensor:
        """(B, F, C, H, W) scaled latents of the ego-motion prior ``prior`` of each window (see :meth:`condition`);
        with a cache, the warp and encoding run only for windows not seen before."""
        if getattr(batch, "grid", None) is None:
            raise ValueError(f"an ego-motion prior ({prior!r}) warps voxels and needs the batch's grid; this "
                             f"batch has none (OccSequenceDataset sets it; a hand-built OccBatch needs grid=)")
        if self.cache is None or not self._names_frames(batch):
            return self.encode(prior_frames(batch.past, batch.ego, batch.grid, prior))
        B, P = batch.past.shape[:2]
        F = batch.ego.shape[1] - P
        keys = [(batch.scenes[b], batch.tokens[b][P - 1], prior, P, k) for b in range(B) for k in range(F)]

        def encode(idx: list[int]) -> torch.Tensor:
            samples = sorted({i // F for i in idx})
            frames = prior_frames(batch.past[samples], batch.ego[samples], batch.grid, prior)   # (S, F, X, Y, Z)
            row = {s: j for j, s in enumerate(samples)}
            chosen = torch.stack([frames[row[i // F], i % F] for i in idx])                  # (N, X, Y, Z)
            return self.encode(chosen[:, None])[:, 0]

        return self.cache.fetch(keys, encode).unflatten(0, (B, F))

    def condition(self, batch, prior: str | None = None, decode_prior: bool = False,
                  past_latents: torch.Tensor | None = None) -> ForecastCond:
        """OccBatch → the forecaster's condition: scaled past latents (B, P, C, H, W), ego poses (B, P+F, 4, 4)
        and, for ``prior`` ∈ :data:`~occ_mfd.ego_motion.PRIORS`, the latents (B, F, C, H, W) of the current frame
        warped to each future frame (the net's ``prior``: see :class:`~occ_mfd.models.forecaster.OccForecaster`).
        ``decode_prior`` (inference): also the voxels the refiner's decoder reads (``cond.decode_prior``); training
        stages never decode, so they skip the warp. ``past_latents``: the history's latents when the caller has
        them already (streaming keeps them between consecutive windows, :mod:`occ_mfd.models.streaming`).
        """
        frames = self.decode_prior(batch) if decode_prior else None
        if prior is None:
            prior_latents = None
        elif frames is not None and prior == self.refiner.prior and self.cache is None:
            prior_latents = self.encode(frames)         # the same warp: made once
        else:
            prior_latents = self.prior_latents(batch, prior)
        lidar_traj = getattr(batch, "lidar_traj", None)
        if past_latents is None:
            past_latents = self.encode_part(batch, "past")
        return ForecastCond(past_latents=past_latents, ego=batch.ego.float(),
                            prior_latents=prior_latents,
                            lidar_traj=None if lidar_traj is None else lidar_traj.float(), decode_prior=frames)

    @torch.no_grad()
    def decode_logits(self, latents: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C, H, W) scaled latents → (B, T, K, X, Y, Z) logits; ``prior`` (B, T, X, Y, Z): the ego-motion
        prior's voxels, required with a refiner (:meth:`decode_prior`), ignored without."""
        B, T = latents.shape[:2]
        logits = self.vae.decode(latents.flatten(0, 1) / self.scale)                 # (B·T, K, X, Y, Z)
        if self.refiner is not None:
            if prior is None or prior.shape[:2] != (B, T):
                got = None if prior is None else tuple(prior.shape)
                raise ValueError(f"this codec's decoder reads the ego-motion prior ({self.refiner.prior!r} refiner): "
                                 f"decode_logits needs its voxels (B, T, X, Y, Z) = ({B}, {T}, …), got {got}")
            logits = self.refiner(logits, prior.flatten(0, 1))
        return logits.unflatten(0, (B, T))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C, H, W) scaled latents → (B, T, X, Y, Z) uint8 class ids (argmax over the classes)."""
        return logits_to_classes(self.decode_logits(latents, prior))


def logits_to_classes(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, K, X, Y, Z) logits → (B, T, X, Y, Z) uint8 ids (first maximum on ties, as ``argmax``)."""
    return logits.argmax(dim=2).to(torch.uint8)


class LatentPrepare(nn.Module):
    """``prepare(batch: OccBatch) -> (x1 (B, F, C, H, W), ForecastCond)``; ``prior``, ``residual``: the net's
    (see :class:`~occ_mfd.models.forecaster.OccForecaster`; with ``residual``, x1 = future − prior latents).

    An ``nn.Module`` on purpose: an objective that stores it as an attribute (``self.prepare = prepare``)
    registers the frozen VAE as a submodule, so ``objective.to(device)`` moves it and the objective's
    checkpoint is self-contained (the VAE has no trainable parameters, so no optimiser or EMA sees it).
    """

    def __init__(self, codec: LatentCodec, prior: str | None = None, residual: bool = False):
        super().__init__()
        if residual and prior is None:
            raise ValueError("LatentPrepare: residual=True needs an ego-motion prior")
        self.codec, self.prior, self.residual = codec, prior, residual

    def forward(self, batch):
        x1, cond = self.codec.encode_part(batch, "future"), self.codec.condition(batch, self.prior)
        if self.residual:                       # the flow's data: what the ego-motion warp gets wrong
            x1 = x1 - cond.prior_latents
        return x1, cond
