"""Scene-level point accumulation: static points in the global frame, dynamic points per instance.

Every sweep of the scene is read once: ego-vehicle points are dropped (sensor frame), points go to the
global frame, points inside an (enlarged) annotated box go to that instance's bucket **in the box's own
frame**, the rest are static. Per keyframe, :mod:`.generate` places each instance's bucket at its box
pose *of that keyframe*, so moving objects leave no trails.

Labels (Occ3D ids) per point: lidarseg where the sweep has it; otherwise the box category inside a box;
static unlabelled points take the nearest labelled static point's label within ``nn_max_dist`` (else
they are dropped). Without any lidarseg in the scene, static points are ``others`` (0).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from occ_mfd.data.nuscenes import SceneRecord, read_lidarseg, read_pcd_bin
from occ_mfd.data.occupancy.points import EGO_BOX, ego_mask, points_in_box, transform
from occ_mfd.grid import IGNORE, category_to_occ3d, lidarseg_to_occ3d

#: Occ3D ids that an annotated box can hold (others..truck); ground/static classes never move with a box.
OBJECT_IDS = np.arange(11)
UNLABELLED = -1


@dataclass
class AccumulatorConfig:
    """box_margin: box enlargement (m) in x, y and up when collecting; box_below: below the box bottom;
    nn_max_dist: label transfer radius (m) for unlabelled static points; use_sweeps: read non-key sweeps;
    ground_clearance: unlabelled points this close (m) to a box's bottom are taken as the road under
    the object (static), not the object — boxes rest on the ground, so without lidarseg the road
    would otherwise move with (and be labelled as) the object; dedup: static points are merged per
    (cell of this size in metres, label, keyframe) into one weighted point — repeated scans of the same
    surface cost nothing per target keyframe (0 disables; keep it well below the voxel size);
    dedup_across_keyframes: merge across keyframes too (right when the static window is the whole scene)."""

    box_margin: float = 0.2
    box_below: float = 0.05
    ground_clearance: float = 0.15
    dedup: float = 0.1
    dedup_across_keyframes: bool = False
    nn_max_dist: float = 1.0
    use_sweeps: bool = True
    ego_box: tuple = EGO_BOX


@dataclass
class SweepPoints:
    """One sweep after reading: keyframe index, sensor origin (3,) global, points (N, 3) global; is_key:
    the keyframe's own sweep (taken at the labels' time), False for the sweeps between keyframes."""

    key_index: int
    origin: np.ndarray
    points: np.ndarray
    is_key: bool = True


@dataclass
class SceneCloud:
    """Accumulated points of one scene.

    static_xyz: (S, 3) float32 global; static_label: (S,) uint8 Occ3D ids; static_key: (S,) int16 the
    keyframe each point's sweep follows; static_weight: (S,) float32 how many raw points each stands for. instances: instance token → (M, 3) box-frame points and (M,)
    labels. sweeps: all sweeps (for ray casting).
    """

    static_xyz: np.ndarray
    static_label: np.ndarray
    static_key: np.ndarray
    instances: dict[str, tuple[np.ndarray, np.ndarray]]
    static_weight: np.ndarray | None = None
    sweeps: list[SweepPoints] = field(default_factory=list)
    has_lidarseg: bool = False


def accumulate_scene(scene: SceneRecord, boxes_of, cfg: AccumulatorConfig = AccumulatorConfig(),
                     on_bad=None) -> SceneCloud:
    """Read and split every sweep of ``scene``.

    ``on_bad(error)``: when given, a sweep whose files are missing or corrupt is reported to it and
    skipped (``--skip-bad``); otherwise the error propagates (it names the file).

    ``boxes_of(sweep, keyframe)`` returns the BoxRecords at the sweep's time (the keyframe's own boxes
    for key sweeps; devkit-interpolated ones for the others).
    """
    st_xyz, st_lab, st_key = [], [], []
    inst_pts, inst_lab = defaultdict(list), defaultdict(list)
    sweeps, any_seg = [], False
    for k, kf in enumerate(scene.keyframes):
        for sw in [kf.lidar, *(kf.sweeps_after if cfg.use_sweeps else [])]:
            try:
                raw = read_pcd_bin(sw.path)
                lab = np.full(len(raw), UNLABELLED, np.int16)
                if sw.lidarseg_path is not None:
                    lab = lidarseg_to_occ3d(read_lidarseg(sw.lidarseg_path, len(raw))).astype(np.int16)
                    any_seg = True
            except (OSError, ValueError) as e:
                if on_bad is None:
                    raise
                on_bad(e)
                continue
            keep = ~ego_mask(raw, sw.sensor2ego, cfg.ego_box) & (lab != IGNORE)
            s2g = sw.ego2global @ sw.sensor2ego
            pts, lab = transform(raw[keep], s2g), lab[keep]
            sweeps.append(SweepPoints(k, s2g[:3, 3].copy(), pts.astype(np.float32), bool(sw.is_key)))
            in_any = np.zeros(len(pts), bool)
            boxes = kf.boxes if sw.is_key else boxes_of(sw, kf)
            if boxes and len(pts):
                tree = cKDTree(pts[:, :2])
                for b in boxes:
                    r = 0.5 * np.hypot(b.wlh[0], b.wlh[1]) + cfg.box_margin
                    cand = np.asarray(tree.query_ball_point(b.center[:2], r), dtype=np.int64)
                    cand = cand[~in_any[cand]]
                    if not len(cand):
                        continue
                    m, local = points_in_box(pts[cand], b.box2global(), b.wlh, cfg.box_margin, cfg.box_below)
                    sel, l = cand[m], lab[cand[m]]
                    # lidarseg says ground/static → it is not part of the object: leave it static.
                    low = local[:, 2] < -b.wlh[2] / 2 + cfg.ground_clearance
                    obj = ((l == UNLABELLED) & ~low) | np.isin(l, OBJECT_IDS)
                    l = np.where(l == UNLABELLED, category_to_occ3d(b.category), l)
                    inst_pts[b.instance_token].append(local[obj].astype(np.float32))
                    inst_lab[b.instance_token].append(l[obj].astype(np.uint8))
                    in_any[sel[obj]] = True
            st_xyz.append(pts[~in_any].astype(np.float32))
            st_lab.append(lab[~in_any])
            st_key.append(np.full(int((~in_any).sum()), k, np.int16))
    xyz = np.concatenate(st_xyz) if st_xyz else np.zeros((0, 3), np.float32)
    lab = np.concatenate(st_lab) if st_lab else np.zeros(0, np.int16)
    key = np.concatenate(st_key) if st_key else np.zeros(0, np.int16)
    xyz, lab, key, wt = _dedup(xyz, lab, key, cfg.dedup, cfg.dedup_across_keyframes)
    keep = _label_static(xyz, lab, any_seg, cfg.nn_max_dist)
    instances = {t: (np.concatenate(inst_pts[t]), np.concatenate(inst_lab[t])) for t in inst_pts}
    return SceneCloud(xyz[keep], lab[keep].astype(np.uint8), key[keep], instances, wt[keep], sweeps, any_seg)


def _dedup(xyz, lab, key, cell: float, across_keyframes: bool = False):
    """Merge points sharing (cell, label, keyframe) into their first point, weighted by the count."""
    w = np.ones(len(xyz), np.float32)
    if cell <= 0 or not len(xyz):
        return xyz, lab, key, w
    q = np.floor(xyz / cell).astype(np.int64)
    q -= q.min(axis=0)
    span = q.max(axis=0) + 1
    # Pack (cell, label + 1, keyframe) into one int64 (checked to fit) so np.unique stays 1-D.
    nlab, nkey = 64, 1 if across_keyframes else int(key.max()) + 1
    if float(np.prod(span.astype(float))) * nlab * nkey >= 2 ** 62:
        return xyz, lab, key, w
    packed = ((np.ravel_multi_index(q.T, tuple(span)) * nlab + (lab.astype(np.int64) + 1)) * nkey + (0 if across_keyframes else key))
    _, first, counts = np.unique(packed, return_index=True, return_counts=True)
    return xyz[first], lab[first], key[first], counts.astype(np.float32)


def _label_static(xyz, lab, any_seg: bool, max_dist: float) -> np.ndarray:
    """Label unlabelled static points in place: nearest labelled point within ``max_dist``; without
    any lidarseg in the scene every static point is ``others`` (0). Returns the mask of points to keep
    (those still unlabelled are dropped)."""
    if not any_seg:
        lab[:] = 0
        return np.ones(len(xyz), bool)
    un = lab == UNLABELLED
    if un.any() and (~un).any():
        d, j = cKDTree(xyz[~un]).query(xyz[un], distance_upper_bound=max_dist)
        found = np.isfinite(d)
        new = np.full(int(un.sum()), UNLABELLED, np.int16)
        new[found] = lab[~un][j[found]]
        lab[un] = new
    return lab != UNLABELLED
