"""Ego motion: extrapolating the ego's trajectory, and seeing a static world from another ego pose.

Poses are (…, 4, 4) transforms of each frame's ego into the *current* ego frame (``OccSequence.ego``: the
current frame is the identity). Used by the model-free baselines ``cv-warp`` / ``warp-last``
(:mod:`occ_mfd.eval.baselines`) and by the forecaster's ego-motion prior (:mod:`occ_mfd.models.codec`): one
implementation, so the baseline and the prior a network learns a residual on are the same thing.
"""
from __future__ import annotations

import torch

from occ_mfd.grid import FREE_ID, GridSpec


def planar_motion(pose: torch.Tensor) -> torch.Tensor:
    """(…, 4, 4) → (…, 3) [dx, dy, dyaw]: the SE(2) part (nuScenes poses are planar: z, pitch, roll ≈ 0)."""
    return torch.stack([pose[..., 0, 3], pose[..., 1, 3], torch.atan2(pose[..., 1, 0], pose[..., 0, 0])], dim=-1)


def planar_pose(motion: torch.Tensor) -> torch.Tensor:
    """(…, 3) [x, y, yaw] → (…, 4, 4) transform (rotation about z, then translation in the xy plane)."""
    x, y, yaw = motion.unbind(-1)
    c, s = torch.cos(yaw), torch.sin(yaw)
    pose = torch.zeros(*motion.shape[:-1], 4, 4, dtype=motion.dtype, device=motion.device)
    pose[..., 0, 0], pose[..., 0, 1], pose[..., 1, 0], pose[..., 1, 1] = c, -s, s, c
    pose[..., 2, 2] = pose[..., 3, 3] = 1.0
    pose[..., 0, 3], pose[..., 1, 3] = x, y
    return pose


def extrapolate_poses(past: torch.Tensor, num_future: int) -> torch.Tensor:
    """Constant speed and yaw rate: future poses from the last step of the past trajectory.

    Args:
        past: (B, P, 4, 4) past poses in the current frame (``past[:, -1]`` = identity), P ≥ 2.
        num_future: F, frames to extrapolate (at the past's frame interval).
    Returns:
        (B, F, 4, 4) planar poses in the current frame: Δ^k for k = 1 … F, where Δ = past[P-2]⁻¹ · past[P-1]
        is the last step expressed in the previous ego frame. Repeating one rigid step in the body frame is
        exactly constant speed and constant yaw rate (a circular arc, a straight line when Δyaw = 0). It uses
        only the last step: the most recent motion is the best predictor over 3 s, and with P = 4 an average
        over older steps lags the ego's acceleration and turn-in.
    """
    if past.ndim != 4 or past.shape[1] < 2 or past.shape[-2:] != (4, 4):
        raise ValueError(f"extrapolate_poses: need (B, P >= 2, 4, 4) past poses, got {tuple(past.shape)}")
    p = past.to(torch.float64)
    step = planar_pose(planar_motion(torch.linalg.solve(p[:, -2], p[:, -1])))       # (B, 4, 4)
    out, pose = [], planar_pose(planar_motion(p[:, -1]))
    for _ in range(num_future):
        pose = pose @ step
        out.append(pose)
    return torch.stack(out, dim=1).to(past.dtype) if out else past.new_zeros(past.shape[0], 0, 4, 4)


def warp_frame(frame: torch.Tensor, poses: torch.Tensor, grid: GridSpec, free_id: int = FREE_ID) -> torch.Tensor:
    """Static-world view: the current frame seen from each of ``poses``.

    Args:
        frame: (B, X, Y, Z) integer labels of the current frame.
        poses: (B, F, 4, 4) target ego poses in the current frame.
        grid: the voxel grid of ``frame``.
    Returns:
        (B, F, X, Y, Z) labels, same dtype as ``frame``.

    Backward (pull) nearest-voxel resampling: the centre p of each target voxel is mapped into the current frame,
    ``q = pose @ p``, and takes the label of the voxel containing q; a q outside the grid has no source and is
    free. Pulling (rather than pushing occupied voxels forward) leaves no holes and needs no collision rule.
    """
    B = frame.shape[0]
    X, Y, Z = grid.shape
    if tuple(frame.shape[1:]) != (X, Y, Z):
        raise ValueError(f"warp_frame: frame grid {tuple(frame.shape[1:])} differs from grid {grid.shape}")
    if poses.ndim != 4 or poses.shape[0] != B or poses.shape[-2:] != (4, 4):
        raise ValueError(f"warp_frame: poses {tuple(poses.shape)} are not (B={B}, F, 4, 4)")
    n_future = poses.shape[1]
    dev = frame.device
    centers = torch.from_numpy(grid.centers()).to(dev, torch.float64).reshape(-1, 3)       # (N, 3)
    lo = torch.tensor(grid.lo, dtype=torch.float64, device=dev)
    dims = torch.tensor([X, Y, Z], device=dev)
    src = frame.reshape(B, -1)                                                             # (B, N)
    out = torch.full((B, n_future, X * Y * Z), free_id, dtype=frame.dtype, device=dev)
    T = poses.to(device=dev, dtype=torch.float64)                                          # (B, F, 4, 4)
    for b in range(B):
        for k in range(n_future):
            q = centers @ T[b, k, :3, :3].T + T[b, k, :3, 3]                               # (N, 3)
            idx = torch.floor((q - lo) / grid.voxel_size).long()
            inside = ((idx >= 0) & (idx < dims)).all(dim=1)
            flat = (idx[:, 0] * Y + idx[:, 1]) * Z + idx[:, 2]
            out[b, k, inside] = src[b, flat[inside]]
    return out.view(B, n_future, X, Y, Z)


#: Ego-motion priors a forecaster can be given (``OccForecaster(prior=...)``): the current frame warped to each
#: future frame by the extrapolated poses (non-privileged) or by the given future poses (planning-conditioned).
PRIORS = ("cv-warp", "warp")


def prior_frames(past: torch.Tensor, ego: torch.Tensor, grid: GridSpec, kind: str,
                 free_id: int = FREE_ID) -> torch.Tensor:
    """The static-world forecast ``kind`` ∈ :data:`PRIORS`: (B, P, X, Y, Z) labels, (B, P+F, 4, 4) poses →
    (B, F, X, Y, Z). ``"cv-warp"`` reads only the past poses; ``"warp"`` reads the given future poses."""
    P, n_future = past.shape[1], ego.shape[1] - past.shape[1]
    if kind == "cv-warp":
        poses = extrapolate_poses(ego[:, :P], n_future)
    elif kind == "warp":
        poses = ego[:, P:]
    else:
        raise ValueError(f"unknown ego-motion prior {kind!r}; known: {', '.join(PRIORS)}")
    return warp_frame(past[:, -1], poses, grid, free_id)
