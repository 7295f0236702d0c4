"""The forecast pipeline: encode the past → Euler on the shifted grid with CFG → decode → argmax.

Evaluation (:meth:`OccForecastPipeline.forecast`) and the speed protocol (``occ_mfd.eval.speed``) run the very
same stage methods (``encode``, ``noise``, ``sample``, ``decode_logits``, ``to_classes``), so what is timed is
what is scored: one sampler, one noise source.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from occ_mfd.flow.guidance import guided
from occ_mfd.flow.solver import euler_integrate
from occ_mfd.flow.time_sampling import time_grid
from occ_mfd.models.codec import LatentCodec, logits_to_classes
from occ_mfd.models.forecaster import ForecastCond


@dataclass(frozen=True)
class SamplerSettings:
    """Euler sampling: ``steps`` network evaluations on the SD3-shifted grid (``shift`` = α), CFG ``cfg_scale``.

    The defaults are OccFM's recipe (10 steps, α = 3, CFG 2); this is the one place that writes them.
    """

    steps: int = 10
    shift: float = 3.0
    cfg_scale: float = 2.0

    def to_dict(self) -> dict:
        return {"steps": int(self.steps), "shift": float(self.shift), "cfg_scale": float(self.cfg_scale)}


#: OccFM's sampler (the teacher's default).
OCCFM_SAMPLER = SamplerSettings()
#: A one-step student: x1 = x0 + net(x0, t = 0, c), one Euler step on the uniform grid [0, 1], no guidance.
ONE_STEP_SAMPLER = SamplerSettings(steps=1, shift=1.0, cfg_scale=1.0)


@dataclass
class Forecast:
    """What any forecaster returns (models and baselines alike).

    classes: (B, F, X, Y, Z) integer ids. nfe: sequential network evaluations per forecast (a CFG step runs
    cond + uncond as one batch of 2B and counts once; 0 for baselines). latents: (B, F, C, H, W) sampled
    latents (model scale) or None.
    """

    classes: torch.Tensor
    nfe: int
    latents: torch.Tensor | None = None


class OccForecastPipeline(nn.Module):
    """Forecast future occupancy with ``net(x_t, t, ForecastCond, drop_cond) -> v`` over ``codec``'s latents.

    ``steps=1`` with the MFD student is the one-step model. ``fused_cfg=False`` runs CFG as two passes of
    batch B (the slow reference for the fused 2B batch, see :func:`occ_mfd.flow.guidance.guided`).
    """

    def __init__(self, codec: LatentCodec, net: nn.Module, sampler: SamplerSettings = OCCFM_SAMPLER,
                 fused_cfg: bool = True):
        super().__init__()
        _check_refiner(getattr(codec, "refiner", None), net)
        self.codec, self.net, self.sampler, self.fused_cfg = codec, net, sampler, fused_cfg

    def attach_refiner(self, refiner: nn.Module) -> None:
        """Decode with ``refiner`` (:class:`~occ_mfd.models.prior_refiner.PriorRefiner`) from now on; it must have
        been trained on this pipeline's VAE (the caller checks: ``tools/eval.py --refiner``)."""
        _check_refiner(refiner, self.net)
        self.codec.refiner = refiner.eval().requires_grad_(False)

    @property
    def steps(self) -> int:
        return self.sampler.steps

    @property
    def shift(self) -> float:
        return self.sampler.shift

    @property
    def cfg_scale(self) -> float:
        return self.sampler.cfg_scale

    # ---------------------------------------------------------------------------------------- stages
    def encode(self, batch) -> ForecastCond:
        """OccBatch → condition: scaled past latents (B, P, C, H, W), ego poses (B, P+F, 4, 4), the net's
        ego-motion prior latents (B, F, C, H, W) when it has one, and the prior's voxels when the decoder reads
        them (a codec with a refiner)."""
        return self.codec.condition(batch, getattr(self.net, "prior", None), decode_prior=True)

    def noise(self, cond: ForecastCond, generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 ~ N(0, I) of shape (B, F, C, H, W), float32.

        Drawn on the generator's device and then moved (a CPU generator gives the same noise on any device);
        without a generator, on the condition's device from the global RNG.
        """
        B, P, C, H, W = cond.past_latents.shape
        dev = cond.past_latents.device
        gdev = generator.device if generator is not None else dev
        shape = (B, cond.ego.shape[1] - P, C, H, W)
        return torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32).to(dev)

    def sample(self, cond: ForecastCond, x0: torch.Tensor, steps: int | None = None,
               cfg_scale: float | None = None) -> torch.Tensor:
        """Integrate the (guided) velocity from x0 at t = 0 to t = 1: (B, F, C, H, W) latents (a residual net's
        output plus its prior latents). A flow-map network (one with ``sample_grid``, i.e.
        ``models.flow_map.FlowMapEndpoint``) is sampled by its own jumps on the same grid instead of Euler."""
        steps = self.steps if steps is None else int(steps)
        scale = self.cfg_scale if cfg_scale is None else float(cfg_scale)
        grid = time_grid(steps, self.shift, device=x0.device, dtype=x0.dtype)
        flow_map_sampler = getattr(self.net, "sample_grid", None)
        if flow_map_sampler is not None:   # a two-time flow map (models/flow_map.py): x ← x + Δt·u(x, t_k, t_{k+1})
            x1 = flow_map_sampler(x0, grid, cond, cfg_scale=scale, fused=self.fused_cfg)
        else:
            velocity = guided(self.net, scale, fused=self.fused_cfg)
            x1 = euler_integrate(lambda x, t: velocity(x, t, cond), x0, grid)
        if getattr(self.net, "residual", False):     # the net generates future − prior latents
            x1 = x1 + cond.prior_latents
        return x1

    def decode_logits(self, latents: torch.Tensor, cond: ForecastCond | None = None) -> torch.Tensor:
        """(B, F, C, H, W) → (B, F, K, X, Y, Z) logits; ``cond``: the condition the latents were sampled under
        (its ``decode_prior`` feeds a refining decoder)."""
        return self.codec.decode_logits(latents, None if cond is None else cond.decode_prior)

    @staticmethod
    def to_classes(logits: torch.Tensor) -> torch.Tensor:
        """(B, F, K, X, Y, Z) logits → (B, F, X, Y, Z) uint8 ids."""
        return logits_to_classes(logits)

    # -------------------------------------------------------------------------------------- the chain
    @torch.no_grad()
    def forecast(self, batch, steps: int | None = None, generator: torch.Generator | None = None,
                 cfg_scale: float | None = None) -> Forecast:
        """encode → noise → sample → decode → argmax; ``steps`` / ``cfg_scale`` None: the sampler's."""
        return self.forecast_from(self.encode(batch), steps, generator, cfg_scale)

    @torch.no_grad()
    def forecast_from(self, cond: ForecastCond, steps: int | None = None, generator: torch.Generator | None = None,
                      cfg_scale: float | None = None) -> Forecast:
        """noise → sample → decode → argmax from a condition already encoded (:meth:`encode`, or streaming's)."""
        x1 = self.sample(cond, self.noise(cond, generator), steps, cfg_scale)
        classes = self.to_classes(self.decode_logits(x1, cond))
        return Forecast(classes=classes, nfe=self.steps if steps is None else int(steps), latents=x1)


def _check_refiner(refiner, net) -> None:
    """A "warp" refiner reads the true future poses: a past-conditioned forecaster's decoder must not see them."""
    if refiner is not None and refiner.prior == "warp" and getattr(net, "traj_mode", None) == "past":
        raise ValueError("the codec's refiner reads the 'warp' prior (the future ego poses): a forecaster "
                         "conditioned on the past trajectory needs a 'cv-warp' refiner")
