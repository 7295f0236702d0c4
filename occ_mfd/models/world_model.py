"""Glue between the VAE, the forecaster and the flow solvers, used by training and evaluation.

- :class:`LatentCodec`: frozen VAE wrapper, occupancy sequences ↔ *scaled* latents (OccFM scales by 10).
- :func:`make_prepare`: ``prepare(batch) -> (x1, ForecastCond)`` for the flow-matching / MFD objectives.
- :class:`OccForecastPipeline`: encode past → Euler on the shifted grid with CFG → decode → argmax.

Cached latents (``OccBatch.latents_past/future``, from :mod:`occ_mfd.engine.latent_cache`) are *raw* VAE
latents (unscaled); the codec applies its scale to them as to freshly encoded ones.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
import torch
from torch import nn

from occ_mfd.flow.guidance import guided
from occ_mfd.flow.solver import euler_integrate
from occ_mfd.flow.time_sampling import time_grid
from occ_mfd.models.forecaster import ForecastCond
from occ_mfd.models.vae import OccVAE


class LatentCodec(nn.Module):
    """Frozen VAE: ``encode(occ (B, T, X, Y, Z)) -> (B, T, C, H, W)`` scaled latents; ``decode`` inverts to ids.

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
        B, T = occ.shape[:2]
        dist = self.vae.encode(occ.flatten(0, 1).long())
        z = dist.sample(generator) if self.sample else dist.mean
        return (z * self.scale).unflatten(0, (B, T))

    def scale_cached(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw cached latents (B, T, C, H, W) → model space."""
        return latents * self.scale

    @torch.no_grad()
    def decode_logits(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) scaled latents → (B, T, K, X, Y, Z) logits."""
        B, T = latents.shape[:2]
        return self.vae.decode(latents.flatten(0, 1) / self.scale).unflatten(0, (B, T))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) scaled latents → (B, T, X, Y, Z) int64 class ids (argmax)."""
        B, T = latents.shape[:2]
        return self.vae.decode(latents.flatten(0, 1) / self.scale).argmax(dim=1).unflatten(0, (B, T))


class LatentPrepare(nn.Module):
    """``prepare(batch: OccBatch) -> (x1 (B, F, C, H, W), ForecastCond)``; uses cached latents when present.

    An ``nn.Module`` on purpose: an objective that stores it as an attribute (``self.prepare = prepare``)
    registers the frozen VAE as a submodule, so ``objective.to(device)`` moves it and the objective's
    checkpoint is self-contained (the VAE has no trainable parameters, so no optimiser or EMA sees it).
    """

    def __init__(self, codec: LatentCodec):
        super().__init__()
        self.codec = codec

    def forward(self, batch):
        if batch.latents_past is not None and batch.latents_future is not None:
            past = self.codec.scale_cached(batch.latents_past.float())
            fut = self.codec.scale_cached(batch.latents_future.float())
        else:
            past, fut = self.codec.encode(batch.past), self.codec.encode(batch.future)
        return fut, ForecastCond(past_latents=past, ego=batch.ego.float())


def make_prepare(codec: LatentCodec) -> LatentPrepare:
    """The ``prepare`` callable of the flow-matching / MFD objectives (see :class:`LatentPrepare`)."""
    return LatentPrepare(codec)


@dataclass
class ForecastOutput:
    """classes: (B, F, X, Y, Z) uint8 forecast ids. latents: (B, F, C, H, W) sampled latents (model scale).
    nfe: network calls (a CFG call runs cond + uncond as one batch of 2B). timings_ms: per stage
    (``encode``, ``sample``, ``decode`` incl. argmax)."""

    classes: torch.Tensor
    latents: torch.Tensor
    nfe: int
    timings_ms: dict[str, float] = field(default_factory=dict)


class OccForecastPipeline(nn.Module):
    """Forecast future occupancy. ``steps=1`` with the MFD student is the one-step model."""

    def __init__(self, codec: LatentCodec, net: nn.Module, steps: int = 10, shift: float = 3.0,
                 cfg_scale: float = 2.0):
        super().__init__()
        self.codec, self.net = codec, net
        self.steps, self.shift, self.cfg_scale = steps, shift, cfg_scale

    def _sync(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    @torch.no_grad()
    def forecast(self, batch, steps: int | None = None, generator: torch.Generator | None = None,
                 cfg_scale: float | None = None) -> ForecastOutput:
        steps = self.steps if steps is None else steps
        scale = self.cfg_scale if cfg_scale is None else cfg_scale
        dev = batch.past.device
        t0 = self._sync(dev)
        if batch.latents_past is not None:
            past = self.codec.scale_cached(batch.latents_past.float())
        else:
            past = self.codec.encode(batch.past)                                    # (B, P, C, H, W)
        t1 = self._sync(dev)
        B, _, C, H, W = past.shape
        n_future = batch.ego.shape[1] - past.shape[1]
        cond = ForecastCond(past_latents=past, ego=batch.ego.float())
        # Noise is drawn on the generator's device (a CPU generator gives the same noise on any device).
        gdev = generator.device if generator is not None else dev
        x0 = torch.randn((B, n_future, C, H, W), generator=generator, device=gdev, dtype=past.dtype).to(dev)
        velocity = guided(self.net, scale)
        grid = time_grid(steps, self.shift, device=dev, dtype=past.dtype)
        x1 = euler_integrate(lambda x, t: velocity(x, t, cond), x0, grid)             # (B, F, C, H, W)
        t2 = self._sync(dev)
        classes = self.codec.decode(x1).to(torch.uint8)
        t3 = self._sync(dev)
        ms = {"encode": 1e3 * (t1 - t0), "sample": 1e3 * (t2 - t1), "decode": 1e3 * (t3 - t2)}
        return ForecastOutput(classes=classes, latents=x1, nfe=steps, timings_ms=ms)


def load_vae_from_checkpoint(path, use_ema: bool = True, map_location="cpu") -> OccVAE:
    """The (EMA) VAE of a checkpoint written by the engine for a :class:`VAEObjective` config."""
    from occ_mfd.engine.checkpoint import build_objective_from_checkpoint

    objective = build_objective_from_checkpoint(path, use_ema=use_ema, map_location=map_location)
    vae = getattr(objective, "vae", None)
    if not isinstance(vae, OccVAE):
        raise ValueError(f"checkpoint {path}: its objective {type(objective).__name__} holds no OccVAE 'vae'")
    return vae.eval().requires_grad_(False)
