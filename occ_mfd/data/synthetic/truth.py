"""Exact semantic occupancy of the synthetic world on a voxel grid in one keyframe's ego frame.

Each voxel is probed at 2 × 2 × 2 sub-sample points (centre ± size/4 per axis). A solid claims a voxel
when at least one sub-sample lies inside it; solids are filled (a car's box voxels are all 'car').
The ground is the half-space z < 0, but only the voxel layer that contains z = 0 is marked (Occ3D keeps
the surface, not the soil): its 4 lower sub-samples are "inside ground", class from the town raster at
the voxel's xy centre. Where several solids claim a voxel, the one with the most sub-samples inside
wins; ties go to the later in this priority order: ground < manmade < vegetation < static objects
(barriers, cones) < vehicles and pedestrians. So a car standing on the road owns the surface voxel
under it (4 vs 4 sub-samples, car later). The ego body is not part of Occ3D and is left out.

On hills (``terrain`` given and not flat) the ground is the height field: in each column of the ego frame
(tilted with the car), the voxel containing the surface point on the column's axis is ground (count 4,
class from the raster there), and solids claim only sub-samples above the surface (a building on a slope,
or a car on a crest, has no part underground). The flat world takes the original path, bit for bit.
"""
from __future__ import annotations

import numpy as np

from occ_mfd.data.synthetic.geometry import Boxes, Cylinders, Spheres
from occ_mfd.grid import FREE_ID, LIDARSEG_TO_OCC3D, GridSpec


def _offsets(vs: float) -> np.ndarray:
    q = vs / 4
    return np.array([[a, b, c] for a in (-q, q) for b in (-q, q) for c in (-q, q)])  # (8, 3)


class _Canvas:
    def __init__(self, grid: GridSpec, ego2global: np.ndarray, terrain=None):
        self.grid = grid
        self.terrain = None if terrain is None or terrain.is_flat else terrain
        self.sem = np.full(grid.shape, FREE_ID, np.uint8)
        self.cnt = np.zeros(grid.shape, np.int8)
        self.e2g = ego2global
        self.g2e = np.linalg.inv(ego2global)
        self.lo, self.vs = np.asarray(grid.lo), grid.voxel_size

    def samples(self, aabb_lo: np.ndarray, aabb_hi: np.ndarray):
        """Sub-samples (global frame) of the voxels overlapping an ego-frame AABB → (idx slices, (n, 8, 3))."""
        i0 = np.maximum(np.floor((aabb_lo - self.lo) / self.vs).astype(int), 0)
        i1 = np.minimum(np.floor((aabb_hi - self.lo) / self.vs).astype(int), np.asarray(self.grid.shape) - 1)
        if np.any(i1 < i0):
            return None, None
        axes = [self.lo[a] + (np.arange(i0[a], i1[a] + 1) + 0.5) * self.vs for a in range(3)]
        c = np.stack(np.meshgrid(*axes, indexing="ij"), -1)                     # (a, b, c, 3) ego frame
        p = c[..., None, :] + _offsets(self.vs)                                 # (a, b, c, 8, 3)
        pg = p @ self.e2g[:3, :3].T + self.e2g[:3, 3]
        return tuple(slice(i0[a], i1[a] + 1) for a in range(3)), pg

    def paint(self, sl, inside: np.ndarray, cls: int, pg: np.ndarray | None = None):
        if self.terrain is not None and pg is not None:
            inside = inside & (pg[..., 2] >= self.terrain.height(pg[..., :2]))
        n = inside.sum(-1).astype(np.int8)
        cur = self.cnt[sl]
        take = (n > 0) & (n >= cur)
        self.sem[sl][take] = cls
        cur[take] = n[take]

    def ego_aabb(self, corners_global: np.ndarray):
        p = corners_global @ self.g2e[:3, :3].T + self.g2e[:3, 3]
        return p.min(0), p.max(0)


def occupancy(grid: GridSpec, ego2global: np.ndarray, ground_class, statics: tuple[Boxes, Cylinders, Spheres],
              objects: Boxes, terrain=None) -> np.ndarray:
    """(X, Y, Z) uint8 Occ3D semantics (17 = free). ``objects``: annotated agents at this keyframe;
    ``terrain``: the world's ``terrain.Terrain`` (None: flat). ``ego2global``: the true (3-D) pose."""
    cv = _Canvas(grid, ego2global, terrain)
    kz = int(np.floor((0.0 - grid.lo[2]) / grid.voxel_size))
    if cv.terrain is not None:
        _paint_terrain(cv, ground_class)
    elif 0 <= kz < grid.shape[2]:
        cen = grid.centers()[:, :, kz, :].reshape(-1, 3).astype(np.float64)
        g = cen @ ego2global[:3, :3].T + ego2global[:3, 3]
        cls = LIDARSEG_TO_OCC3D[ground_class(g[:, :2])].reshape(grid.shape[:2])
        cv.sem[:, :, kz] = cls
        cv.cnt[:, :, kz] = 4
    reach = np.linalg.norm(np.maximum(np.abs(grid.lo[:2]), np.abs(grid.hi[:2])))
    ego_xy = ego2global[:2, 3]
    boxes, cyl, sph = statics
    for labels in ((28,), (30,)):  # manmade, then vegetation (priority order)
        _paint_boxes(cv, boxes, np.isin(boxes.label, labels), ego_xy, reach)
        _paint_cylinders(cv, cyl, np.isin(cyl.label, labels), ego_xy, reach)
        _paint_spheres(cv, sph, np.isin(sph.label, labels), ego_xy, reach)
    static_obj = np.isin(objects.label, (9, 12))
    _paint_boxes(cv, objects, static_obj, ego_xy, reach)
    _paint_boxes(cv, objects, ~static_obj, ego_xy, reach)
    return cv.sem


def _paint_terrain(cv: _Canvas, ground_class):
    """Mark the voxel holding the terrain surface in each column (Newton on the column's axis, which the
    car's tilt makes slightly oblique to the world vertical)."""
    grid, e2g = cv.grid, cv.e2g
    cen = grid.centers()[:, :, 0, :].reshape(-1, 3).astype(np.float64)
    a = np.concatenate([cen[:, :2], np.zeros((len(cen), 1))], 1) @ e2g[:3, :3].T + e2g[:3, 3]   # column at z = 0
    axis = e2g[:3, 2]
    t = np.zeros(len(cen))
    for _ in range(8):
        p = a + t[:, None] * axis
        g = p[:, 2] - cv.terrain.height(p[:, :2])
        slope = axis[2] - cv.terrain.gradient(p[:, :2]) @ axis[:2]
        t -= g / slope
    p = a + t[:, None] * axis
    k = np.floor((t - grid.lo[2]) / grid.voxel_size).astype(np.int64)
    ok = (k >= 0) & (k < grid.shape[2])
    i, j = np.unravel_index(np.flatnonzero(ok), grid.shape[:2])
    cv.sem[i, j, k[ok]] = LIDARSEG_TO_OCC3D[ground_class(p[ok, :2])]
    cv.cnt[i, j, k[ok]] = 4


def _near(c_xy, r, ego_xy, reach):
    return np.linalg.norm(c_xy - ego_xy, axis=1) < reach + r


def _paint_boxes(cv: _Canvas, b: Boxes, mask, ego_xy, reach):
    c, r = b.bounding_spheres()
    for j in np.flatnonzero(mask & _near(c[:, :2], r, ego_xy, reach)):
        cs, sn = np.cos(b.yaw[j]), np.sin(b.yaw[j])
        rot = np.array([[cs, -sn, 0], [sn, cs, 0], [0, 0, 1]])
        loc = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * b.half[j]
        sl, p = cv.samples(*cv.ego_aabb(loc @ rot.T + b.center[j]))
        if sl is None:
            continue
        rel = (p - b.center[j]) @ rot                                          # into the box frame
        cv.paint(sl, np.all(np.abs(rel) <= b.half[j], axis=-1), int(LIDARSEG_TO_OCC3D[b.label[j]]), p)


def _paint_cylinders(cv: _Canvas, cy: Cylinders, mask, ego_xy, reach):
    for j in np.flatnonzero(mask & _near(cy.xy, cy.radius, ego_xy, reach)):
        r = cy.radius[j]
        corners = np.array([[cy.xy[j, 0] + a * r, cy.xy[j, 1] + b * r, z] for a in (-1, 1) for b in (-1, 1)
                            for z in (cy.z0[j], cy.z1[j])])
        sl, p = cv.samples(*cv.ego_aabb(corners))
        if sl is None:
            continue
        ins = (np.hypot(p[..., 0] - cy.xy[j, 0], p[..., 1] - cy.xy[j, 1]) <= r) & (p[..., 2] >= cy.z0[j]) \
            & (p[..., 2] <= cy.z1[j])
        cv.paint(sl, ins, int(LIDARSEG_TO_OCC3D[cy.label[j]]), p)


def _paint_spheres(cv: _Canvas, s: Spheres, mask, ego_xy, reach):
    for j in np.flatnonzero(mask & _near(s.center[:, :2], s.radius, ego_xy, reach)):
        r = s.radius[j]
        corners = s.center[j] + np.array([[a, b, c] for a in (-r, r) for b in (-r, r) for c in (-r, r)])
        sl, p = cv.samples(*cv.ego_aabb(corners))
        if sl is None:
            continue
        cv.paint(sl, np.linalg.norm(p - s.center[j], axis=-1) <= r, int(LIDARSEG_TO_OCC3D[s.label[j]]), p)
