"""Conditional flow matching, and the OccFM teacher objective built on it.

Loss (Lipman et al. 2023, Eq. 23; our convention t = 0 noise): E || v(x_t, t, c) - (x1 - x0) ||^2 with
x_t = (1 - t) x0 + t x1, x0 ~ N(0, I), t ~ logit-normal (SD3). The forecaster predicts all frames but the
loss is on future frames: ``prepare`` returns only the future latents as x1 and the past inside ``cond``.

``OccFlowTeacher`` is what ``configs/*/occfm.py`` build: the frozen VAE of the VAE stage's snapshot (or, in
stored configs, its description), the forecaster sized by the VAE's latent channels, condition dropout 0.2
for CFG, and the sampler inference uses (OccFM's recipe by default, ``SamplerSettings``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from occ_mfd.flow.path import LinearPath
from occ_mfd.flow.time_sampling import LogitNormalTime
from occ_mfd.models.codec import LatentCodec, LatentPrepare
from occ_mfd.models.forecaster import OccForecaster
from occ_mfd.models.pipeline import OCCFM_SAMPLER, SamplerSettings
from occ_mfd.models.snapshot import InferenceParts, snapshot_or_description
from occ_mfd.objectives.base import LossOutput, Objective


def flow_matching_loss(
    net: Callable,
    x1: torch.Tensor,
    cond: Any,
    t: torch.Tensor,
    x0: torch.Tensor | None = None,
    drop_cond: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar FM loss. x1, x0: (B, ...); t: (B,); loss_mask broadcastable to x1 (1 = counts).
    Mean over counted elements (masked mean)."""
    if x0 is None:
        x0 = torch.randn_like(x1)
    ps = LinearPath().sample(x0, x1, t)
    v = net(ps.x_t, t, cond) if drop_cond is None else net(ps.x_t, t, cond, drop_cond=drop_cond)
    err = (v - ps.dx_t).pow(2)  # (B, ...)
    if loss_mask is None:
        return err.mean()
    m = loss_mask.to(err.dtype).expand_as(err)
    return (err * m).sum() / m.sum().clamp_min(1.0)


class FlowMatchingObjective(Objective):
    """Conditional FM for ``net(x_t, t, cond, drop_cond=None) -> v``.

    ``prepare(batch)`` returns ``(x1, cond)`` or ``(x1, cond, loss_mask)``. ``cond_drop_prob``: fraction of
    samples trained unconditionally (sets ``drop_cond``) so CFG works at sampling time. The loop keeps an
    EMA of ``net``.
    """

    def __init__(
        self,
        net: nn.Module,
        prepare: Callable[[Any], tuple],
        *,
        time_sampler: Callable = LogitNormalTime(0.0, 1.0),
        cond_drop_prob: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        self.net = net
        self.prepare = prepare
        self.time_sampler = time_sampler
        self.cond_drop_prob = float(cond_drop_prob)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"main": [p for p in self.net.parameters() if p.requires_grad]}

    def ema_modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def forward(self, batch, phase: str = "main") -> LossOutput:
        out = self.prepare(batch)
        if len(out) not in (2, 3):
            raise ValueError("prepare(batch) must return (x1, cond) or (x1, cond, loss_mask)")
        x1, cond = out[0], out[1]
        mask = out[2] if len(out) == 3 else None
        B = x1.shape[0]
        t = self.time_sampler(B, device=x1.device).to(x1.dtype)
        drop = None
        if self.cond_drop_prob > 0:
            drop = torch.rand(B, device=x1.device) < self.cond_drop_prob
        loss = flow_matching_loss(self.net, x1, cond, t, drop_cond=drop, loss_mask=mask)
        logs = {"fm_loss": loss.detach()}
        if drop is not None:
            logs["cond_drop_frac"] = drop.float().mean()
        return LossOutput(loss=loss, logs=logs)


class OccFlowTeacher(FlowMatchingObjective):
    """OccFM teacher objective: latent flow matching over a frozen occupancy VAE.

    Args:
        net: OccForecaster keyword arguments *without* ``latent_channels`` (taken from the VAE); or (a config
            spec with a ``type`` key, which the config builder builds first) another forecaster with the same
            contract (``forward(x_t, t, cond, drop_cond)``, attributes ``latent_channels``, ``prior``,
            ``residual``), e.g. the released OccFM's flow net
            (:class:`~occ_mfd.models.occfm_official.adapter.OccFmForecaster`).
        vae_snapshot / vae: the frozen VAE: the VAE stage's snapshot (file or work dir), or (in stored
            configs) its description.
        latent_scale: latents are multiplied by this before flow matching (OccFM: 10).
        cond_drop_prob: fraction of samples trained without history/trajectory (CFG); OccFM: 0.2.
        time_mean, time_std: logit-normal training times.
        steps, shift, cfg_scale: the sampler inference uses (default: OccFM's, :data:`OCCFM_SAMPLER`).
        latent_cache_mb: > 0 caches the frozen VAE's latents of the training frames (the encoder then runs once
            per frame instead of every step; :class:`~occ_mfd.models.latent_cache.LatentCache`).
    """

    def __init__(self, net: dict | nn.Module, vae_snapshot: str | None = None, vae: dict | None = None,
                 latent_scale: float = 10.0, cond_drop_prob: float = 0.2, time_mean: float = 0.0,
                 time_std: float = 1.0, steps: int = OCCFM_SAMPLER.steps, shift: float = OCCFM_SAMPLER.shift,
                 cfg_scale: float = OCCFM_SAMPLER.cfg_scale, latent_cache_mb: float = 0.0):
        vae_snap, vae_desc = snapshot_or_description(vae_snapshot, vae, "vae", kinds=("vae",))
        vae_model = vae_snap.build("vae")
        if isinstance(net, nn.Module):   # another architecture behind the forecaster contract (built from its spec)
            forecaster = net
            if forecaster.latent_channels != vae_model.latent_channels:
                raise ValueError(f"objective.net ({type(net).__name__}) takes {forecaster.latent_channels} latent "
                                 f"channels, the VAE gives {vae_model.latent_channels}")
        elif "latent_channels" in net:
            raise ValueError("objective.net must not set latent_channels: it is the VAE's")
        else:
            forecaster = OccForecaster(latent_channels=vae_model.latent_channels, **net)
        codec = LatentCodec(vae_model, scale=latent_scale, cache_mb=latent_cache_mb, refiner=vae_snap.refiner())
        super().__init__(forecaster, LatentPrepare(codec,
                                                     forecaster.prior, forecaster.residual),
                         time_sampler=LogitNormalTime(time_mean, time_std), cond_drop_prob=cond_drop_prob)
        self.sampler = SamplerSettings(int(steps), float(shift), float(cfg_scale))
        self._portable = {"vae_snapshot": None, "vae": vae_desc} if vae_desc is not None else {}
        self._source = (f"VAE snapshot {vae_snap.path or '(stored description)'}", vae_snap.grid)

    @property
    def codec(self) -> LatentCodec:
        return self.prepare.codec

    def portable_config(self) -> dict:
        return self._portable

    def source(self) -> tuple[str, dict | None]:
        return self._source

    def inference_parts(self) -> InferenceParts:
        return InferenceParts("teacher", {**self.codec.networks(), "net": self.net},
                              latent_scale=self.codec.scale, sampler=self.sampler)
