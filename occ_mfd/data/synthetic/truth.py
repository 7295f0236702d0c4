"""Exact semantic occupancy of the synthetic world on a voxel grid in one keyframe's ego frame.

**Convention.** A solid claims a voxel when the two share interior points, i.e. their intersection has a
positive volume; voxels are the closed cubes ``[lo + i·s, lo + (i+1)·s]`` per axis. So a box straddling
a voxel boundary claims the voxels on both sides, a box wholly inside one voxel still claims it, and a
solid that only *touches* a voxel (a face, edge or corner on the voxel's boundary, or a sphere or cylinder
tangent to it) does not claim it. Overlaps thinner than ``EPS`` (1 nm) count as touching: a face placed
on a voxel boundary by arithmetic (1.0 + 0.6 vs −4 + 14 · 0.4) lands a few ulps either side of it.
The tests are analytic: boxes by the separating-axis theorem (any orientation, also the tilted ego frame
of a hill), spheres by the distance from the centre to the voxel, vertical cylinders by the disc–square
distance when the ego frame is level and, when it is tilted, by the exact distance in xy from the axis to
the voxel's part between the cylinder's caps (see ``_cylinder_hits_tilted``). Solids are filled (a car's
inside voxels are all 'car'). The previous convention (2 × 2 × 2 sub-samples at centre ± s/4) left a
voxel free when a face fell in its outer s/4, so the voxel holding a surface's LiDAR returns could be free.

**Ground.** The ground is the half-space z < 0, but only the voxel layer that contains z = 0 is marked
(Occ3D keeps the surface, not the soil), class from the town raster at the voxel's xy centre.

**Several claims.** Every solid overlapping a voxel claims it, and the later in this priority order wins:
ground < manmade < vegetation < static objects (barriers, cones) < vehicles and pedestrians. So a car
standing on the road owns the surface voxels under its whole footprint, partly covered ones included.
The ego body is not part of Occ3D and is left out.

On hills (``terrain`` given and not flat) the ground is the height field: in each column of the ego frame
(tilted with the car), the voxel containing the surface point on the column's axis is ground (class from
the raster there), and a solid claims an overlapped voxel only if the voxel reaches above the surface
(one of its corners is above it): a building on a slope, or a car on a crest, has no part underground.
This part is not exact — the overlap is not clipped to the part above the surface — but it differs only
in voxels that the surface crosses.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np

from occ_mfd.data.synthetic.geometry import Boxes, Cylinders, Spheres
from occ_mfd.grid import FREE_ID, LIDARSEG_TO_OCC3D, GridSpec

#: Overlaps (or gaps) thinner than this, in metres, are floating-point noise at a shared face: touching.
EPS = 1e-9

_UNIT = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], float)          # cube corners
_EDGES = np.array([(i, j) for i, j in combinations(range(8), 2) if np.abs(_UNIT[i] - _UNIT[j]).sum() == 1])


def _rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


class _Canvas:
    """The grid in one ego frame; primitives come in global coordinates and are tested in the ego frame."""

    def __init__(self, grid: GridSpec, ego2global: np.ndarray, terrain=None):
        self.grid = grid
        self.terrain = None if terrain is None or terrain.is_flat else terrain
        self.sem = np.full(grid.shape, FREE_ID, np.uint8)
        self.e2g = np.asarray(ego2global, np.float64)
        self.g2e = np.linalg.inv(self.e2g)
        self.lo, self.vs = np.asarray(grid.lo), grid.voxel_size
        # Level ego frame (z along global z): vertical cylinders stay vertical, the cheap exact test applies.
        self.level = bool(np.allclose(self.e2g[:3, 2], [0.0, 0.0, 1.0], atol=1e-12))

    def to_ego(self, p: np.ndarray) -> np.ndarray:
        return p @ self.g2e[:3, :3].T + self.g2e[:3, 3]

    def window(self, pts_global: np.ndarray):
        """Voxels whose cube meets the ego-frame AABB of ``pts_global`` → (index slices, (a, b, c, 3) lower
        corners in the ego frame), or (None, None) when it misses the grid."""
        p = self.to_ego(pts_global)
        i0 = np.maximum(np.floor((p.min(0) - self.lo) / self.vs).astype(int), 0)
        i1 = np.minimum(np.floor((p.max(0) - self.lo) / self.vs).astype(int), np.asarray(self.grid.shape) - 1)
        if np.any(i1 < i0):
            return None, None
        axes = [self.lo[a] + np.arange(i0[a], i1[a] + 1) * self.vs for a in range(3)]
        return tuple(slice(i0[a], i1[a] + 1) for a in range(3)), np.stack(np.meshgrid(*axes, indexing="ij"), -1)

    def claim(self, sl, hit: np.ndarray, cls: int, vlo: np.ndarray):
        """Later claims win (callers paint in priority order); on hills, not where wholly underground."""
        if self.terrain is not None and hit.any():
            corners = (vlo[..., None, :] + _UNIT * self.vs) @ self.e2g[:3, :3].T + self.e2g[:3, 3]
            above = (corners[..., 2] >= self.terrain.height(corners[..., :2].reshape(-1, 2))
                     .reshape(corners.shape[:-1])).any(-1)
            hit = hit & above
        self.sem[sl][hit] = cls


def box_hits(vlo: np.ndarray, vs: float, center: np.ndarray, axes: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Voxels [vlo, vlo + vs] (…, 3) that share volume with the box ``center`` + ``axes`` @ (±``half``)
    (ego frame; ``axes`` columns are the box's unit axes) → bool (…). Separating-axis theorem: two convex
    boxes are disjoint iff their projections are disjoint on one of the 3 + 3 face normals or the 9 edge
    cross products; parallel edges give a zero cross product, which separates nothing and is skipped."""
    cand = [np.eye(3)[i] for i in range(3)] + [axes[:, j] for j in range(3)]
    cand += [np.cross(np.eye(3)[i], axes[:, j]) for i in range(3) for j in range(3)]
    L = np.array([a / np.linalg.norm(a) for a in cand if np.linalg.norm(a) > 1e-9])   # (k, 3) unit axes
    reach = vs / 2 * np.abs(L).sum(1) + np.abs(L @ axes) @ half                        # both radii, per axis
    d = (center - (vlo + vs / 2)) @ L.T                                               # centre gap, per axis
    return np.all(np.abs(d) < reach - EPS, axis=-1)


def sphere_hits(vlo: np.ndarray, vs: float, center: np.ndarray, r: float) -> np.ndarray:
    """Voxels that share volume with the ball: the voxel's closest point to the centre is nearer than r."""
    q = np.clip(center, vlo, vlo + vs)
    return np.linalg.norm(q - center, axis=-1) < r - EPS


def cylinder_hits_level(vlo: np.ndarray, vs: float, xy: np.ndarray, r: float, z0: float, z1: float):
    """Vertical cylinder in a level frame: the z ranges overlap and the disc reaches into the voxel's square."""
    dz = np.minimum(z1, vlo[..., 2] + vs) - np.maximum(z0, vlo[..., 2])
    q = np.clip(xy, vlo[..., :2], vlo[..., :2] + vs)
    return (dz > EPS) & (np.linalg.norm(q - xy, axis=-1) < r - EPS)


def _cylinder_hits_tilted(cv: _Canvas, vlo: np.ndarray, xy: np.ndarray, r: float, z0: float, z1: float):
    """Vertical cylinder (global frame) against voxels of a tilted ego frame, exactly.

    The voxel's part between the caps, P = voxel ∩ {z0 ≤ z ≤ z1}, is convex; its vertices are the voxel
    corners between the caps and the crossings of its 12 edges with the two cap planes. The cylinder
    meets P iff P's shadow on the xy plane meets the disc: either the axis passes through P (the axis
    segment hits the voxel), or the shadow's boundary — made of segments between P's vertices, all of
    which lie inside P — comes nearer than r to the axis. So the minimum over all vertex pairs is exact."""
    shape = vlo.shape[:-1]
    c = (vlo.reshape(-1, 1, 3) + _UNIT * cv.vs) @ cv.e2g[:3, :3].T + cv.e2g[:3, 3]          # (n, 8, 3) global
    a, b = c[:, _EDGES[:, 0]], c[:, _EDGES[:, 1]]                                           # (n, 12, 3)
    with np.errstate(divide="ignore", invalid="ignore"):                                  # edges parallel to a cap
        t = (np.array([z0, z1])[None, :, None] - a[:, None, :, 2]) / (b - a)[:, None, :, 2]  # (n, 2, 12)
        cross = a[:, None, :, :2] + t[..., None] * (b - a)[:, None, :, :2]
    verts = np.concatenate([c[..., :2], cross.reshape(len(c), 24, 2)], 1)                # (n, 32, 2)
    ok = np.concatenate([(c[..., 2] >= z0) & (c[..., 2] <= z1), ((t >= 0) & (t <= 1)).reshape(len(c), 24)], 1)
    verts = np.where(ok[..., None], verts, 0.0)                                           # no NaN downstream
    i, j = np.triu_indices(32, 1)
    p, e = verts[:, i], verts[:, j] - verts[:, i]                                         # (n, 496, 2)
    s = np.clip(np.einsum("npk,npk->np", xy - p, e) / np.maximum((e * e).sum(-1), 1e-30), 0, 1)
    dist = np.linalg.norm(p + s[..., None] * e - xy, axis=-1)
    near = (np.where(ok[:, i] & ok[:, j], dist, np.inf).min(1) < r - EPS) | \
        (ok & (np.linalg.norm(verts - xy, axis=-1) < r - EPS)).any(1)                      # single vertex
    dz = np.minimum(z1, c[..., 2].max(1)) - np.maximum(z0, c[..., 2].min(1))
    return ((dz > EPS) & (near | _axis_hits(cv, vlo.reshape(-1, 3), xy, z0, z1))).reshape(shape)


def _axis_hits(cv: _Canvas, vlo: np.ndarray, xy: np.ndarray, z0: float, z1: float) -> np.ndarray:
    """Does the axis segment (xy, z0 → z1) pass through the voxel? Slab test in the ego frame."""
    o = cv.to_ego(np.array([xy[0], xy[1], z0]))
    d = cv.to_ego(np.array([xy[0], xy[1], z1])) - o
    d = np.where(np.abs(d) < 1e-15, 1e-15, d)
    t1, t2 = (vlo - o) / d, (vlo + cv.vs - o) / d
    tin = np.maximum(np.minimum(t1, t2).max(-1), 0.0)
    tout = np.minimum(np.maximum(t1, t2).min(-1), 1.0)
    return tin < tout


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
        g = cen @ cv.e2g[:3, :3].T + cv.e2g[:3, 3]
        cv.sem[:, :, kz] = LIDARSEG_TO_OCC3D[ground_class(g[:, :2])].reshape(grid.shape[:2])
    reach = np.linalg.norm(np.maximum(np.abs(grid.lo[:2]), np.abs(grid.hi[:2])))
    ego_xy = cv.e2g[:2, 3]
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


def _near(c_xy, r, ego_xy, reach):
    return np.linalg.norm(c_xy - ego_xy, axis=1) < reach + r


def _paint_boxes(cv: _Canvas, b: Boxes, mask, ego_xy, reach):
    c, r = b.bounding_spheres()
    for j in np.flatnonzero(mask & _near(c[:, :2], r, ego_xy, reach)):
        rot = _rot_z(b.yaw[j])
        loc = (_UNIT * 2 - 1) * b.half[j]
        sl, vlo = cv.window(loc @ rot.T + b.center[j])
        if sl is None:
            continue
        hit = box_hits(vlo, cv.vs, cv.to_ego(b.center[j]), cv.g2e[:3, :3] @ rot, b.half[j])
        cv.claim(sl, hit, int(LIDARSEG_TO_OCC3D[b.label[j]]), vlo)


def _paint_cylinders(cv: _Canvas, cy: Cylinders, mask, ego_xy, reach):
    for j in np.flatnonzero(mask & _near(cy.xy, cy.radius, ego_xy, reach)):
        r, xy, z0, z1 = cy.radius[j], cy.xy[j], cy.z0[j], cy.z1[j]
        corners = np.array([[xy[0] + a * r, xy[1] + b * r, z] for a in (-1, 1) for b in (-1, 1) for z in (z0, z1)])
        sl, vlo = cv.window(corners)
        if sl is None:
            continue
        if cv.level:
            o = cv.to_ego(np.array([xy[0], xy[1], 0.0]))
            hit = cylinder_hits_level(vlo, cv.vs, o[:2], r, z0 + o[2], z1 + o[2])
        else:
            hit = _cylinder_hits_tilted(cv, vlo, xy, r, z0, z1)
        cv.claim(sl, hit, int(LIDARSEG_TO_OCC3D[cy.label[j]]), vlo)


def _paint_spheres(cv: _Canvas, s: Spheres, mask, ego_xy, reach):
    for j in np.flatnonzero(mask & _near(s.center[:, :2], s.radius, ego_xy, reach)):
        r = s.radius[j]
        sl, vlo = cv.window(s.center[j] + (_UNIT * 2 - 1) * r)
        if sl is None:
            continue
        cv.claim(sl, sphere_hits(vlo, cv.vs, cv.to_ego(s.center[j]), r), int(LIDARSEG_TO_OCC3D[s.label[j]]), vlo)
