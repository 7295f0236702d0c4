"""Model-free baselines: copy the last observed frame, or warp it by the ego motion (static world).

Both return a :class:`~occ_mfd.models.pipeline.Forecast` with ``nfe = 0`` and ignore the noise generator.
"""
from __future__ import annotations

import torch

from occ_mfd.models.pipeline import Forecast
from occ_mfd.grid import FREE_ID, GridSpec


def copy_last(past: torch.Tensor, num_future: int) -> torch.Tensor:
    """(B, P, X, Y, Z) → (B, F, X, Y, Z): the current frame ``past[:, -1]`` repeated F times."""
    return past[:, -1:].expand(-1, num_future, -1, -1, -1).clone()


def warp_last(past: torch.Tensor, ego: torch.Tensor, grid: GridSpec, free_id: int = FREE_ID) -> torch.Tensor:
    """Static-world forecast: the current frame seen from each future ego pose.

    Args:
        past: (B, P, X, Y, Z) integer labels; ``past[:, -1]`` is the current frame.
        ego: (B, P+F, 4, 4) pose of each frame's ego in the current ego frame (``OccSequence.ego``).
        grid: the voxel grid of ``past``.
    Returns:
        (B, F, X, Y, Z) labels, same dtype as ``past``.

    Backward (pull) nearest-voxel resampling: the centre p of each target voxel of future frame k is mapped
    into the current frame, ``q = ego[P+k] @ p``, and takes the label of the voxel containing q; a q outside
    the grid has no source and is free. Pulling (rather than pushing occupied voxels forward) leaves no holes
    and needs no collision rule.
    """
    B, P = past.shape[:2]
    n_future = ego.shape[1] - P
    X, Y, Z = grid.shape
    if tuple(past.shape[2:]) != (X, Y, Z):
        raise ValueError(f"warp_last: past grid {tuple(past.shape[2:])} differs from grid {grid.shape}")
    dev = past.device
    centers = torch.from_numpy(grid.centers()).to(dev, torch.float64).reshape(-1, 3)       # (N, 3)
    lo = torch.tensor(grid.lo, dtype=torch.float64, device=dev)
    dims = torch.tensor([X, Y, Z], device=dev)
    last = past[:, -1].reshape(B, -1)                                                      # (B, N)
    out = torch.full((B, n_future, X * Y * Z), free_id, dtype=past.dtype, device=dev)
    T = ego[:, P:].to(torch.float64)                                                       # (B, F, 4, 4)
    for b in range(B):
        for k in range(n_future):
            q = centers @ T[b, k, :3, :3].T + T[b, k, :3, 3]                               # (N, 3)
            idx = torch.floor((q - lo) / grid.voxel_size).long()
            inside = ((idx >= 0) & (idx < dims)).all(dim=1)
            flat = (idx[:, 0] * Y + idx[:, 1]) * Z + idx[:, 2]
            out[b, k, inside] = last[b, flat[inside]]
    return out.view(B, n_future, X, Y, Z)


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


class VAEReconstruction:
    """Row "vae-recon": the VAE's reconstruction of the *ground-truth* future (encode → decode → argmax).

    Not a forecaster: it reads the future. It is the ceiling of every latent forecaster that decodes through
    the same VAE, so a table shows how much of the gap to 100 is the tokenizer's.
    """

    name, steps = "vae-recon", 0

    def __init__(self, codec):
        self.codec = codec

    @torch.no_grad()
    def __call__(self, batch, generator: torch.Generator | None = None) -> Forecast:
        return Forecast(classes=self.codec.decode(self.codec.encode(batch.future)), nfe=0)


BASELINES = {"copy-last": lambda grid: CopyLast(), "warp-last": lambda grid: WarpLast(grid)}
