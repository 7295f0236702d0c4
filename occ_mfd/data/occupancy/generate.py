"""One keyframe's semantic occupancy from a scene's accumulated points (see :mod:`.accumulate`).

In the target keyframe's ego frame: static points of the keyframes within ``window`` plus every
instance's box-frame points placed at that instance's box pose at the target keyframe → majority vote
per voxel → occupied voxels. Rays from the sensor origin of each sweep within ``ray_window`` keyframes
to its returns are traversed exactly (:mod:`.raycast`): observed = traversed ∪ hit; observed and not
occupied = free (17). Unobserved voxels stay free in ``semantics`` (as in Occ3D) with ``mask_lidar`` 0.

Inside the target keyframe's boxes (``box_voxels``) only the rays of that keyframe's own sweep count as
traversals: a sweep taken at another time (the sweeps between keyframes, other keyframes) sees a moving
object elsewhere, and its rays would cross the object's volume *at the target time* and mark the unseen
inside of the object observed-free (hits still count everywhere).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from occ_mfd.data.nuscenes import KeyframeRecord
from occ_mfd.data.occ3d import OccFrame
from occ_mfd.data.occupancy.accumulate import SceneCloud
from occ_mfd.data.occupancy.camera import frustum_mask
from occ_mfd.data.occupancy.points import majority_vote, rigid_inverse, transform
from occ_mfd.data.occupancy.raycast import traverse_into
from occ_mfd.grid import FREE_ID, OCC3D_GRID, GridSpec


@dataclass
class FrameConfig:
    """grid: output grid; window: static points from keyframes within ±window (None: whole scene);
    ray_window: rays from the sweeps of keyframes within ±ray_window (0: the target keyframe's own sweep
    and the sweeps up to the next keyframe); box_rays_key_only: inside the target keyframe's boxes only its
    own sweep's rays mark voxels traversed (see the module doc); dedup_rays: cast one ray per (sweep, end voxel) — the
    traversed sets differ only in the last voxels before the end, and it is ~3× fewer rays."""

    grid: GridSpec = OCC3D_GRID
    window: int | None = None
    ray_window: int = 0
    dedup_rays: bool = True
    camera_mask: bool = True
    fill_ground: int = 4
    fill_min_neighbours: int = 3
    place_margin: float = 0.05
    box_rays_key_only: bool = True


#: Ground classes (driveable_surface, other_flat, sidewalk, terrain): a continuous surface.
GROUND_IDS = (11, 12, 13, 14)


def _neighbour_count(layer: np.ndarray) -> np.ndarray:
    """(X, Y) bool → (X, Y) int: how many of the 8 in-plane neighbours are set."""
    p = np.pad(layer.astype(np.int8), 1)
    X, Y = layer.shape
    return sum(p[1 + dx:1 + dx + X, 1 + dy:1 + dy + Y] for dx in (-1, 0, 1) for dy in (-1, 0, 1)
               if dx or dy)


def fill_ground_holes(sem: np.ndarray, iterations: int = 4, min_neighbours: int = 3) -> np.ndarray:
    """Close gaps between LiDAR rings in the ground surface.

    Far from the sensor the rings are sparser than the voxels, so grazing rays would mark unhit ground
    voxels as free. A free voxel whose column holds nothing in the layers just above and below, with at
    least ``min_neighbours`` of its 8 same-layer neighbours ground, becomes the most frequent neighbour
    ground class; repeated ``iterations`` times (each closes gaps one voxel wider). ``sem``: (X, Y, Z)
    uint8; a modified copy is returned. Only layers holding ground are touched.
    """
    sem = sem.copy()
    ground_ids = np.asarray(GROUND_IDS, np.uint8)
    for _ in range(iterations):
        changed = False
        occ = sem != FREE_ID
        for z in np.flatnonzero(np.isin(sem, ground_ids).any(axis=(0, 1))):
            near = occ[:, :, z].copy()
            if z > 0:
                near |= occ[:, :, z - 1]
            if z + 1 < sem.shape[2]:
                near |= occ[:, :, z + 1]
            counts = np.stack([_neighbour_count(sem[:, :, z] == c) for c in ground_ids])  # (4, X, Y)
            cand = ~near & (counts.sum(0) >= min_neighbours)
            if cand.any():
                sem[:, :, z][cand] = ground_ids[counts[:, cand].argmax(0)]
                changed = True
        if not changed:
            break
    return sem


def _in_window(key: np.ndarray, k: int, w: int | None) -> np.ndarray:
    return np.ones(len(key), bool) if w is None else np.abs(key.astype(np.int64) - k) <= w


def occupied_points(cloud: SceneCloud, kf: KeyframeRecord, k: int, cfg: FrameConfig):
    """(N, 3) points, (N,) labels and (N,) weights in keyframe ``k``'s ego frame: static (windowed) +
    placed instances."""
    g2e = rigid_inverse(kf.ego2global)
    reach = np.linalg.norm(np.asarray(cfg.grid.hi) - np.asarray(cfg.grid.lo)) / 2 + 1.0
    ego_xy = kf.ego2global[:2, 3]
    sel = _in_window(cloud.static_key, k, cfg.window)
    sel &= np.abs(cloud.static_xyz[:, :2] - ego_xy).max(axis=1) <= reach  # cheap crop before transforming
    pts = [transform(cloud.static_xyz[sel], g2e)]
    labs = [cloud.static_label[sel]]
    wts = [cloud.static_weight[sel] if cloud.static_weight is not None else np.ones(int(sel.sum()), np.float32)]
    for b in kf.boxes:
        if b.instance_token not in cloud.instances:
            continue
        local, lab = cloud.instances[b.instance_token]
        # Collected with an enlarged box (so no object point stays static); placed only inside the box
        # itself (+ place_margin), so the collection margin does not fatten the object.
        half = np.array([b.wlh[1], b.wlh[0], b.wlh[2]]) / 2 + cfg.place_margin
        keep = np.all(np.abs(local) <= half, axis=1)
        local, lab = local[keep], lab[keep]
        box2ego = g2e @ b.box2global()
        pts.append(transform(local, box2ego))
        labs.append(lab)
        wts.append(np.ones(len(lab), np.float32))
    return np.concatenate(pts), np.concatenate(labs), np.concatenate(wts)


def box_voxels(kf: KeyframeRecord, grid: GridSpec, pad: float | None = None) -> np.ndarray:
    """(num_voxels,) bool: voxels whose centre lies in one of ``kf``'s boxes enlarged by ``pad`` (default:
    half a voxel diagonal, so every voxel the object overlaps is in)."""
    pad = grid.voxel_size * np.sqrt(3) / 2 if pad is None else pad
    out = np.zeros(grid.shape, bool)
    g2e = rigid_inverse(kf.ego2global)
    lo, vs, shape = np.asarray(grid.lo), grid.voxel_size, np.asarray(grid.shape)
    for b in kf.boxes:
        box2ego = g2e @ b.box2global()
        half = np.array([b.wlh[1], b.wlh[0], b.wlh[2]]) / 2 + pad
        corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * half
        c = transform(corners, box2ego)
        i0 = np.maximum(np.floor((c.min(0) - lo) / vs).astype(int), 0)
        i1 = np.minimum(np.floor((c.max(0) - lo) / vs).astype(int), shape - 1)
        if np.any(i1 < i0):
            continue
        ijk = np.stack(np.meshgrid(*[np.arange(i0[a], i1[a] + 1) for a in range(3)], indexing="ij"), -1).reshape(-1, 3)
        local = transform(grid.index_to_center(ijk), rigid_inverse(box2ego))
        inside = np.all(np.abs(local) <= half, axis=1)
        out[tuple(ijk[inside].T)] = True
    return out.reshape(-1)


def _one_ray_per_end_voxel(ends: np.ndarray, grid: GridSpec) -> np.ndarray:
    """``ends`` keeping the first return of each end voxel (in their order). The voxel (i, j, k) is packed into
    one int64 so ``np.unique`` stays 1-D (``axis=0`` sorts rows of a structured view, several times slower);
    the first returns kept are the same either way."""
    q = np.floor((ends - np.asarray(grid.lo)) / grid.voxel_size).astype(np.int64)
    q -= q.min(axis=0)
    packed = np.ravel_multi_index(q.T, tuple(q.max(axis=0) + 1))
    _, first = np.unique(packed, return_index=True)
    return ends[np.sort(first)]


def ray_masks(cloud: SceneCloud, kf: KeyframeRecord, k: int, cfg: FrameConfig) -> tuple[np.ndarray, np.ndarray]:
    """(num_voxels,) bool masks of the voxels traversed and hit by the rays of the sweeps within ``ray_window``
    (inside the keyframe's boxes, traversals only from its own sweep when ``cfg.box_rays_key_only``)."""
    g2e = rigid_inverse(kf.ego2global)
    own = np.zeros(cfg.grid.num_voxels, bool)         # traversed by rays that count inside the boxes too
    other = np.zeros(cfg.grid.num_voxels, bool)       # traversed by the other sweeps' rays
    hit = np.zeros(cfg.grid.num_voxels, bool)
    in_box = box_voxels(kf, cfg.grid) if cfg.box_rays_key_only and kf.boxes else None
    for sw in cloud.sweeps:
        if abs(sw.key_index - k) > cfg.ray_window:
            continue
        ends = transform(sw.points, g2e)
        if cfg.dedup_rays and len(ends):
            ends = _one_ray_per_end_voxel(ends, cfg.grid)
        origin = transform(sw.origin[None], g2e)[0]
        counts_in_box = in_box is None or (sw.is_key and sw.key_index == k)
        traverse_into(own if counts_in_box else other, hit, origin, ends, cfg.grid)
    if in_box is not None:
        other &= ~in_box
    return own | other, hit


def ray_voxels(cloud: SceneCloud, kf: KeyframeRecord, k: int, cfg: FrameConfig):
    """Flat ids (sorted) of the voxels traversed and hit: :func:`ray_masks` as id lists."""
    trav, hit = ray_masks(cloud, kf, k, cfg)
    return np.flatnonzero(trav), np.flatnonzero(hit)


def keyframe_occupancy(cloud: SceneCloud, kf: KeyframeRecord, k: int, cfg: FrameConfig) -> OccFrame:
    """The Occ3D labels of keyframe ``k`` (arrays of ``cfg.grid.shape``, uint8)."""
    grid = cfg.grid
    pts, labs, wts = occupied_points(cloud, kf, k, cfg)
    vox, cls = majority_vote(pts, labs, grid, wts)
    trav, hit = ray_masks(cloud, kf, k, cfg)
    sem = np.full(grid.num_voxels, FREE_ID, np.uint8)
    sem[vox] = cls
    mask = (trav | hit).astype(np.uint8)
    sem, mask = sem.reshape(grid.shape), mask.reshape(grid.shape)
    if cfg.fill_ground:
        sem = fill_ground_holes(sem, cfg.fill_ground, cfg.fill_min_neighbours)
    cam = mask.copy()
    if cfg.camera_mask and kf.cameras:
        cam &= frustum_mask(grid, kf.cameras, kf.ego2global).astype(np.uint8)
    return OccFrame(sem, mask, cam)
