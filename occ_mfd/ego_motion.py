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


def _axis_centers(grid: GridSpec, device: torch.device) -> list[torch.Tensor]:
    """The voxel-centre coordinates along x, y and z: three 1-D float64 tensors (X,), (Y,), (Z,) holding exactly
    the values of :meth:`GridSpec.centers` (``lo + (i + 0.5) · size`` in float64, rounded to float32), whose
    (X, Y, Z, 3) array is their outer product. Built per call; nothing is cached."""
    return [(grid.lo[a] + (torch.arange(n, dtype=torch.float64) + 0.5) * grid.voxel_size)
            .to(torch.float32).to(device, torch.float64) for a, n in enumerate(grid.shape)]


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

    The arithmetic is fixed, because a q on a voxel face is assigned by the last bit of the float64
    ``floor((q - lo) / size)`` (a shift by half a voxel puts centres on faces: exactly when the centres are exact in
    float32, e.g. for a power-of-two voxel size, else within their float32 rounding). Coordinate i of q is, in
    float64: the products ``p_j · R[i, j]`` (p: the float32-valued centres of :meth:`GridSpec.centers`), summed left
    to right over j = x, y, z, each rounded (no fused multiply-add), then ``+ t_i``; then ``- lo_i``, ``/ size``
    (the same scalar division as before), ``floor``. That is what the earlier per-frame ``centers @ R.T + t`` (a
    BLAS matmul on numpy centres, one frame at a time) computed on CPU with this build's MKL, so the labels are
    bit-identical to it; ``tests/test_ego_motion.py`` checks against a copy of it, with centres placed on faces to
    the last bit. (A BLAS that fuses the multiply-adds, e.g. cuBLAS, made the old version differ from this in the
    last bit of q.) The rest is written for speed, one pass for all B·F frames, with no Python loop over frames and
    no numpy:

    * The centres are separable (coordinate j of a centre depends only on its index along axis j), so each
      product is taken once per axis value, (B·F, X|Y|Z), and broadcast by the sums.
    * A term whose ``R[i, j]`` is exactly 0 in every frame is left out: adding ±0 changes a sum at most in the
      sign of a zero, which ``floor((q - lo) / size)`` cannot see. So q_i and its index are computed only over
      the axes it depends on: for planar (yaw-only) poses, e.g. from :func:`extrapolate_poses`, the x and y
      indices over X × Y and the z index over Z, not over all X·Y·Z voxels of every frame. Poses with pitch or
      roll (raw nuScenes poses) need every coordinate over every voxel: (B·F, X, Y, Z) float64 temporaries.
    * The source is padded by one free voxel on every side and each index is clamped into [-1, n], so an index
      outside the grid lands in the padding: a single gather (``index_select``) of the summed flat index gives
      the output, with no inside-mask and no masked writes. The flat index is summed in float64 (whole numbers
      far below 2^53, so exact) and converted to an integer once; clamping (and sending NaN to the padding)
      before the conversion gives non-finite poses a defined result: free, as the old version's out-of-range
      int64 conversion gave on x86.
    """
    B = frame.shape[0]
    X, Y, Z = grid.shape
    if tuple(frame.shape[1:]) != (X, Y, Z):
        raise ValueError(f"warp_frame: frame grid {tuple(frame.shape[1:])} differs from grid {grid.shape}")
    if poses.ndim != 4 or poses.shape[0] != B or poses.shape[-2:] != (4, 4):
        raise ValueError(f"warp_frame: poses {tuple(poses.shape)} are not (B={B}, F, 4, 4)")
    n_future = poses.shape[1]
    dev = frame.device
    if B * n_future == 0:
        return frame.new_full((B, n_future, X, Y, Z), free_id)
    T = poses.to(device=dev, dtype=torch.float64).reshape(B * n_future, 4, 4)            # (B·F, 4, 4)
    uses = (T[:, :3, :3] != 0).any(dim=0).tolist()             # uses[i][j]: does q_i depend on axis j anywhere
    axes = _axis_centers(grid, dev)
    dims = (X, Y, Z)
    src = frame.new_full((B, X + 2, Y + 2, Z + 2), free_id)                               # free padding
    src[:, 1:-1, 1:-1, 1:-1] = frame
    strides = ((Y + 2) * (Z + 2), Z + 2, 1)
    flat = None     # Σ_i idx_i · stride_i, in float64: whole numbers far below 2^53, so every step is exact
    for i in range(3):
        q = None
        for j in range(3):
            if uses[i][j]:
                view = [-1 if a == j else 1 for a in range(3)]
                term = axes[j].view(1, *view) * T[:, i, j].view(-1, 1, 1, 1)            # (B·F, ·, ·, ·)
                q = term if q is None else q + term
        t = T[:, i, 3].view(-1, 1, 1, 1)
        q = t.clone() if q is None else q.add_(t)          # q is a fresh (B·F, …) tensor: in place from here on
        # the index along axis i; -1 and n (outside the grid) are the padding; NaN stays NaN (mapped below)
        q.sub_(grid.lo[i]).div_(grid.voxel_size).floor_().clamp_(-1, dims[i]).mul_(strides[i])
        if flat is None or torch.broadcast_shapes(flat.shape, q.shape) != flat.shape:
            flat = q if flat is None else flat + q
        else:
            flat.add_(q)
    # + the batch offset and +1 per axis for the padding; a NaN coordinate (non-finite poses) reads the padding
    # voxel at 0, free, as the loop version's out-of-range int64 did
    offset = (torch.arange(B, device=dev, dtype=torch.float64) * src[0].numel() + sum(strides))
    flat = flat.add_(offset.repeat_interleave(n_future).view(-1, 1, 1, 1)).nan_to_num_(nan=0.0)
    index = flat.expand(B * n_future, X, Y, Z).to(torch.int32 if src.numel() < 2**31 else torch.int64)
    return src.view(-1).index_select(0, index.reshape(-1)).view(B, n_future, X, Y, Z)


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
