"""``mask_camera``: voxels the LiDAR observed that also lie inside some camera's view frustum.

Occ3D computes camera visibility by casting rays from the cameras; we use the simpler frustum test
(voxel centre in front of a camera, projecting inside its image) combined with ``mask_lidar``. So
``mask_camera`` ⊆ ``mask_lidar``, and a voxel hidden behind a wall but inside a frustum still counts —
a superset of Occ3D's camera mask. Without camera calibrations it equals ``mask_lidar``.
"""
from __future__ import annotations

import numpy as np

from occ_mfd.grid import GridSpec


def frustum_mask(grid: GridSpec, cameras, ego2global_target: np.ndarray, near: float = 0.1) -> np.ndarray:
    """(X, Y, Z) bool: voxel centres (target ego frame) inside at least one camera frustum.

    ``cameras``: objects with ``cam2ego``, ``ego2global``, ``intrinsic`` (3, 3), ``width``, ``height``.
    """
    c = grid.centers().reshape(-1, 3).astype(np.float64)
    out = np.zeros(len(c), bool)
    for cam in cameras:
        cam2target = np.linalg.inv(ego2global_target) @ cam.ego2global @ cam.cam2ego
        t2c = np.linalg.inv(cam2target)
        p = c @ t2c[:3, :3].T + t2c[:3, 3]
        z = p[:, 2]
        front = z > near
        uv = p[front] @ np.asarray(cam.intrinsic).T
        u, v = uv[:, 0] / uv[:, 2], uv[:, 1] / uv[:, 2]
        ok = (u >= 0) & (u < cam.width) & (v >= 0) & (v < cam.height)
        sub = np.flatnonzero(front)[ok]
        out[sub] = True
    return out.reshape(grid.shape)
