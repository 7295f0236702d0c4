"""Model-free baselines: copy the last observed frame, or warp it by the ego motion (static world) — by the
ego motion extrapolated from the past poses (``cv-warp``, a fair rival of past-conditioned models) or by the
true future poses (``warp-last``, privileged).

Both return a :class:`~occ_mfd.models.pipeline.Forecast` with ``nfe = 0`` and ignore the noise generator.
"""
from __future__ import annotations

import torch

from occ_mfd.ego_motion import prior_frames
from occ_mfd.grid import FREE_ID, GridSpec
from occ_mfd.models.pipeline import Forecast


def copy_last(past: torch.Tensor, num_future: int) -> torch.Tensor:
    """(B, P, X, Y, Z) → (B, F, X, Y, Z): the current frame ``past[:, -1]`` repeated F times."""
    return past[:, -1:].expand(-1, num_future, -1, -1, -1).clone()


def warp_last(past: torch.Tensor, ego: torch.Tensor, grid: GridSpec, free_id: int = FREE_ID) -> torch.Tensor:
    """Static-world forecast: the current frame seen from each *given* future ego pose.

    past: (B, P, X, Y, Z) labels (``past[:, -1]`` is the current frame); ego: (B, P+F, 4, 4) poses in the
    current frame (``OccSequence.ego``) → (B, F, X, Y, Z). See :func:`occ_mfd.ego_motion.warp_frame`.
    """
    return prior_frames(past, ego, grid, "warp", free_id)


def cv_warp(past: torch.Tensor, ego: torch.Tensor, grid: GridSpec, free_id: int = FREE_ID) -> torch.Tensor:
    """Static-world forecast from the *past* poses only: the current frame seen from the poses a constant speed
    and yaw rate extrapolate (:func:`occ_mfd.ego_motion.extrapolate_poses`). Same arguments as
    :func:`warp_last`; the future poses in ``ego`` are not read."""
    return prior_frames(past, ego, grid, "cv-warp", free_id)


class CopyLast:
    """Baseline forecaster "copy-last"."""

    name, steps = "copy-last", 0

    def __call__(self, batch, generator: torch.Generator | None = None) -> Forecast:
        n_future = batch.ego.shape[1] - batch.past.shape[1]
        return Forecast(classes=copy_last(batch.past, n_future), nfe=0)


class WarpLast:
    """Baseline forecaster "warp-last" on ``grid`` (the grid of the evaluated data).

    It warps by the *ground-truth future ego poses* (a static world seen from where the ego will be): it
    knows the future trajectory, like planning-conditioned models (DOME, OccFM's ``fut`` variant), unlike a
    model conditioned on the past trajectory only. Compare it with those.
    """

    name, steps = "warp-last", 0

    def __init__(self, grid: GridSpec, free_id: int = FREE_ID):
        self.grid, self.free_id = grid, free_id

    def __call__(self, batch, generator: torch.Generator | None = None) -> Forecast:
        return Forecast(classes=warp_last(batch.past, batch.ego, self.grid, self.free_id), nfe=0)


class CVWarp(WarpLast):
    """Baseline forecaster "cv-warp": the current frame warped by the ego motion a constant speed and yaw rate
    extrapolate from the past poses. Non-privileged (reads no future information), so it is the bar a model
    conditioned on the past trajectory must clear: a learned forecaster that does not beat it has not learnt
    more than the ego's own motion."""

    name = "cv-warp"

    def __call__(self, batch, generator: torch.Generator | None = None) -> Forecast:
        return Forecast(classes=cv_warp(batch.past, batch.ego, self.grid, self.free_id), nfe=0)


class VAEReconstruction:
    """Row "vae-recon": the VAE's reconstruction of the *ground-truth* future (encode → decode → argmax).

    Not a forecaster: it reads the future. It is the ceiling of every latent forecaster that decodes through
    the same VAE, so a table shows how much of the gap to 100 is the tokenizer's.
    """

    name, steps = "vae-recon", 0

    def __init__(self, codec):
        self.codec = codec

    def frames(self, batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, F, X, Y, Z): what is encoded and decoded — the ground-truth future."""
        return batch.future

    @torch.no_grad()
    def __call__(self, batch, generator: torch.Generator | None = None) -> Forecast:
        coded = self.codec.decode(self.codec.encode(self.frames(batch, generator)), self.codec.decode_prior(batch))
        return Forecast(classes=coded, nfe=0)


class ThroughVAE(VAEReconstruction):
    """Row "<baseline>+vae": a baseline's forecast encoded and decoded by a model's VAE (``decode(encode(·))``).

    A diagnostic, not a new forecaster: it shows how much of a voxel-space baseline survives the tokenizer. A
    latent forecaster that is handed the same warp as its prior (``configs/tiny/occfm_ego.py``) can at best
    reproduce this row by copying its prior, so the gap between ``cv-warp`` and ``cv-warp+vae`` is the
    tokenizer's share of what a learned forecaster loses against the warp.
    """

    def __init__(self, codec, baseline):
        super().__init__(codec)
        self.baseline, self.name = baseline, f"{baseline.name}+vae"

    def frames(self, batch, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.baseline(batch, generator).classes


BASELINES = {"copy-last": lambda grid: CopyLast(), "cv-warp": lambda grid: CVWarp(grid),
             "warp-last": lambda grid: WarpLast(grid)}
