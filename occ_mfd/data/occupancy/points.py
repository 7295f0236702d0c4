"""Point-level helpers: rigid transforms, ego-vehicle removal, points in boxes, majority vote."""
from __future__ import annotations

import numpy as np

from occ_mfd.ego import NUSCENES_EGO
from occ_mfd.grid import NUM_CLASSES, GridSpec

#: The ego-vehicle removal box ((x, y, z) min, (x, y, z) max) in the **ego** frame (x forward from the rear
#: axle, y left, z up from the ground): nuScenes' Renault Zoe plus mirrors and margins, defined and
#: justified once, in :data:`occ_mfd.ego.NUSCENES_EGO`. LiDAR returns inside it are the car itself
#: (lidarseg "vehicle.ego").
EGO_BOX = NUSCENES_EGO.removal_box


def transform(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply a (4, 4) transform to (N, ≥3) points → (N, 3) float64."""
    p = np.asarray(points, dtype=np.float64)[:, :3]
    return p @ m[:3, :3].T + m[:3, 3]


def rigid_inverse(m: np.ndarray) -> np.ndarray:
    """Inverse of a (4, 4) rotation + translation, without a general matrix inverse."""
    inv = np.eye(4)
    inv[:3, :3] = m[:3, :3].T
    inv[:3, 3] = -m[:3, :3].T @ m[:3, 3]
    return inv


def ego_mask(points_sensor: np.ndarray, sensor2ego: np.ndarray, box=EGO_BOX) -> np.ndarray:
    """(N,) bool, True for points of one sweep (sensor frame) that hit the ego vehicle.

    Applied per sweep on the raw sensor-frame points, before any ego→global step (like the devkit's
    ``remove_close``); the box is stated in the ego frame because the car's shape is, so the test maps
    the points by that same sweep's own ``sensor2ego`` only.
    """
    p = transform(points_sensor, sensor2ego)
    lo, hi = np.asarray(box[0]), np.asarray(box[1])
    return np.all((p >= lo) & (p <= hi), axis=1)


def points_in_box(points_global: np.ndarray, box2global: np.ndarray, wlh: np.ndarray,
                  margin: float = 0.0, below: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Points inside a (optionally enlarged) box.

    The box frame is nuScenes': x along the length ``l``, y along the width ``w``, z up, origin at the centre.
    ``margin`` enlarges x, y and the top; ``below`` enlarges the bottom (kept small so the road under an
    object is not swept along with it).
    Returns: (N,) bool inside mask and (M, 3) the inside points in the box frame.
    """
    p = transform(points_global, rigid_inverse(box2global))
    w, l, h = wlh
    m = ((np.abs(p[:, 0]) <= l / 2 + margin) & (np.abs(p[:, 1]) <= w / 2 + margin)
         & (p[:, 2] >= -h / 2 - below) & (p[:, 2] <= h / 2 + margin))
    return m, p[m]


def majority_vote(points: np.ndarray, labels: np.ndarray, grid: GridSpec,
                  weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Most frequent label per voxel, vectorised (ties → the lower class id).

    Args:
        points: (N, 3) metric points in the grid frame; labels: (N,) ints in 0..NUM_CLASSES-1;
        weights: (N,) how many points each stands for (default 1).
    Returns:
        voxel_ids: (V,) sorted flat ids of voxels holding at least one point; voxel_labels: (V,) uint8.
    """
    idx, inside = grid.point_to_index(points)
    flat = np.ravel_multi_index(idx[inside].T, grid.shape)
    # Number the occupied voxels 0..V-1 in id order (a bitmap, no sort), then count (voxel, class) pairs in
    # a (V, classes) table: bincount sums the weights in point order, the same sums as a sort-based count.
    occupied = np.zeros(grid.num_voxels, bool)
    occupied[flat] = True
    vox = np.flatnonzero(occupied)
    rank = np.cumsum(occupied) - 1
    key = rank[flat] * NUM_CLASSES + np.asarray(labels)[inside].astype(np.int64)
    w = None if weights is None else np.asarray(weights)[inside]
    table = np.bincount(key, weights=w, minlength=len(vox) * NUM_CLASSES).reshape(len(vox), NUM_CLASSES)
    return vox, table.argmax(axis=1).astype(np.uint8)       # argmax: the first (lowest) class among equals
