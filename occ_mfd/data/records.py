"""Records passed between stages: one occupancy sequence (numpy) and a batch of them (torch).

Shapes: P past frames (incl. the current one, index P-1), F future frames, grid (X, Y, Z).
Occupancy values are Occ3D ids 0..17 (17 = free).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from occ_mfd.grid import GridSpec


@dataclass
class OccSequence:
    """One window of a scene.

    Attributes:
        past: (P, X, Y, Z) uint8 semantics of the history, oldest first; ``past[-1]`` is the current frame.
        future: (F, X, Y, Z) uint8 semantics of the frames to forecast.
        ego: (P+F, 4, 4) float32, pose of each frame's ego in the *current* frame's ego frame
            (so ``ego[P-1]`` is the identity).
        mask_future: (F, X, Y, Z) bool visibility mask of the future ground truth, or None (all visible).
        scene: scene name; tokens: the P+F sample tokens in time order.
        grid: the voxel grid of ``past`` / ``future`` (None where unknown), for ego-motion warps.
        lidar_traj: (P+F, 2) float32, each frame's LiDAR-origin displacement (m) to the next keyframe in that
            frame's LiDAR frame (:func:`occ_mfd.data.sequences.lidar_displacements`), or None where unknown:
            the trajectory condition of the released OccFM.
    """

    past: np.ndarray
    future: np.ndarray
    ego: np.ndarray
    mask_future: np.ndarray | None = None
    scene: str = ""
    tokens: list[str] = field(default_factory=list)
    grid: GridSpec | None = None
    lidar_traj: np.ndarray | None = None


@dataclass
class OccBatch:
    """A collated batch of :class:`OccSequence` on one device.

    Attributes:
        past: (B, P, X, Y, Z) int64.  future: (B, F, X, Y, Z) int64.
        ego: (B, P+F, 4, 4) float32.  mask_future: (B, F, X, Y, Z) bool or None.
        scenes, tokens: per-sample metadata.  grid: the voxel grid (None where unknown).
        lidar_traj: (B, P+F, 2) float32 or None (see :class:`OccSequence`).
    """

    past: torch.Tensor
    future: torch.Tensor
    ego: torch.Tensor
    mask_future: torch.Tensor | None = None
    scenes: list[str] = field(default_factory=list)
    tokens: list[list[str]] = field(default_factory=list)
    grid: GridSpec | None = None
    lidar_traj: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.past.shape[0]

    def pin_memory(self, device: torch.device | str | None = None) -> "OccBatch":
        """A copy with every tensor field in page-locked memory (the rest kept as is), so ``to(cuda,
        non_blocking=True)`` overlaps the copy. torch's DataLoader (``pin_memory=True``) calls this method on
        batch types it does not know; without it a dataclass batch would pass through unpinned. ``device``:
        accepted for the ``pin_memory(device)`` signature of older torch versions, unused."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.pin_memory() if isinstance(v, torch.Tensor) else v
        return OccBatch(**out)

    def to(self, device: torch.device | str) -> "OccBatch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        return OccBatch(**out)


def collate_sequences(items: list[OccSequence]) -> OccBatch:
    """Stack sequences into an :class:`OccBatch` (optional fields must be all-present or all-absent)."""

    def stack(name: str, dtype: torch.dtype):
        vals = [getattr(it, name) for it in items]
        if all(v is None for v in vals):
            return None
        if any(v is None for v in vals):
            raise ValueError(f"collate_sequences: field {name!r} is present for some samples only")
        return torch.from_numpy(np.stack(vals)).to(dtype)

    return OccBatch(
        past=stack("past", torch.int64),
        future=stack("future", torch.int64),
        ego=stack("ego", torch.float32),
        mask_future=stack("mask_future", torch.bool),
        scenes=[it.scene for it in items],
        tokens=[list(it.tokens) for it in items],
        grid=items[0].grid if all(it.grid == items[0].grid for it in items) else None,
        lidar_traj=stack("lidar_traj", torch.float32),
    )
