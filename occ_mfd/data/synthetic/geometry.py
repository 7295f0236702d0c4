"""Solid primitives of the synthetic world and their exact ray intersections (numpy, vectorised).

Three shapes cover the town: yawed boxes (buildings, walls, hedges, vehicles, pedestrians, barriers,
cones), vertical cylinders (tree trunks, poles) and spheres (tree crowns). The ground is the plane z = 0
and lives in ``lidar.py``/``truth.py``. Every intersection function works on *pairs*: ray ``i`` against
primitive ``j`` for index arrays of equal length, so the caller can cull first and only test the pairs
that can possibly hit (see ``lidar.py``). All return the entry distance along the (unit) ray, ``inf``
where the pair misses or the primitive lies behind the origin.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_EPS = 1e-12


@dataclass
class Boxes:
    """Yawed boxes standing upright.

    Attributes:
        center: (N, 3) box centres, global frame.
        half: (N, 3) half extents along the box's own x (length), y (width), z (height).
        yaw: (N,) rotation about +z; yaw 0 puts the box length along global +x.
        label: (N,) uint8 nuScenes-lidarseg index of the surface.
    """

    center: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    half: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    yaw: np.ndarray = field(default_factory=lambda: np.zeros(0))
    label: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))

    def __len__(self) -> int:
        return len(self.yaw)

    def bounding_spheres(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) centres and (N,) radii of spheres enclosing each box."""
        return self.center, np.linalg.norm(self.half, axis=1)


@dataclass
class Cylinders:
    """Vertical cylinders: (N, 2) axis xy, (N,) radius, (N,) bottom z0 and top z1, (N,) uint8 label."""

    xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    radius: np.ndarray = field(default_factory=lambda: np.zeros(0))
    z0: np.ndarray = field(default_factory=lambda: np.zeros(0))
    z1: np.ndarray = field(default_factory=lambda: np.zeros(0))
    label: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))

    def __len__(self) -> int:
        return len(self.radius)

    def bounding_spheres(self) -> tuple[np.ndarray, np.ndarray]:
        c = np.concatenate([self.xy, ((self.z0 + self.z1) / 2)[:, None]], axis=1)
        return c, np.hypot(self.radius, (self.z1 - self.z0) / 2)


@dataclass
class Spheres:
    """(N, 3) centres, (N,) radii, (N,) uint8 label."""

    center: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    radius: np.ndarray = field(default_factory=lambda: np.zeros(0))
    label: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))

    def __len__(self) -> int:
        return len(self.radius)

    def bounding_spheres(self) -> tuple[np.ndarray, np.ndarray]:
        return self.center, self.radius


def make_boxes(center, size_wlh, yaw, label) -> Boxes:
    """Boxes from nuScenes-style (w, l, h) sizes; ``label`` may be a scalar."""
    size = np.asarray(size_wlh, dtype=np.float64).reshape(-1, 3)
    half = np.stack([size[:, 1], size[:, 0], size[:, 2]], axis=1) / 2
    n = len(half)
    return Boxes(np.asarray(center, np.float64).reshape(n, 3), half,
                 np.broadcast_to(np.asarray(yaw, np.float64), (n,)).copy(),
                 np.broadcast_to(np.asarray(label, np.uint8), (n,)).copy())


def concat_boxes(parts: list[Boxes]) -> Boxes:
    parts = [p for p in parts if len(p)]
    if not parts:
        return Boxes()
    return Boxes(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("center", "half", "yaw", "label")))


def ray_box(o: np.ndarray, d: np.ndarray, boxes: Boxes, j: np.ndarray) -> np.ndarray:
    """Slab test. o: (3,) ray origin, d: (M, 3) unit directions, j: (M,) box index → (M,) entry distance."""
    c, s = np.cos(boxes.yaw[j]), np.sin(boxes.yaw[j])
    rel = o[None, :] - boxes.center[j]                                  # (M, 3)
    # Rotate into the box frame (inverse yaw).
    ol = np.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]], axis=1)
    dl = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]], axis=1)
    dl = np.where(np.abs(dl) < _EPS, _EPS, dl)
    inv = 1.0 / dl
    h = boxes.half[j]
    t1 = (-h - ol) * inv
    t2 = (h - ol) * inv
    tnear = np.minimum(t1, t2).max(axis=1)
    tfar = np.maximum(t1, t2).min(axis=1)
    hit = (tnear <= tfar) & (tnear > 0)
    return np.where(hit, tnear, np.inf)


def ray_cylinder(o: np.ndarray, d: np.ndarray, cyl: Cylinders, j: np.ndarray) -> np.ndarray:
    """Vertical capped cylinder: side wall (quadratic in xy) and the top/bottom caps → (M,) entry distance."""
    rx, ry = o[0] - cyl.xy[j, 0], o[1] - cyl.xy[j, 1]
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    r = cyl.radius[j]
    z0, z1 = cyl.z0[j], cyl.z1[j]
    a = dx * dx + dy * dy
    b = rx * dx + ry * dy
    cc = rx * rx + ry * ry - r * r
    disc = b * b - a * cc
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = (-b - np.sqrt(disc)) / np.maximum(a, _EPS)
    z_side = o[2] + t_side * dz
    side_ok = (disc >= 0) & (a > _EPS) & (t_side > 0) & (z_side >= z0) & (z_side <= z1)
    t_side = np.where(side_ok, t_side, np.inf)
    # Caps: the plane z = z1 (seen from above) or z = z0 (from below), inside the disc.
    dzs = np.where(np.abs(dz) < _EPS, _EPS, dz)
    zc = np.where(dz < 0, z1, z0)
    t_cap = (zc - o[2]) / dzs
    px, py = rx + t_cap * dx, ry + t_cap * dy
    cap_ok = (t_cap > 0) & (px * px + py * py <= r * r)
    t_cap = np.where(cap_ok, t_cap, np.inf)
    return np.minimum(t_side, t_cap)


def ray_sphere(o: np.ndarray, d: np.ndarray, sph: Spheres, j: np.ndarray) -> np.ndarray:
    """(M,) entry distance into sphere ``j`` (unit directions)."""
    rel = o[None, :] - sph.center[j]
    b = np.einsum("ij,ij->i", rel, d)
    cc = np.einsum("ij,ij->i", rel, rel) - sph.radius[j] ** 2
    disc = b * b - cc
    with np.errstate(invalid="ignore"):
        t = -b - np.sqrt(disc)
    return np.where((disc >= 0) & (t > 0), t, np.inf)


def inside_boxes(p: np.ndarray, boxes: Boxes, j: int) -> np.ndarray:
    """(M, 3) points → (M,) bool: inside box ``j`` (boundary included)."""
    c, s = np.cos(boxes.yaw[j]), np.sin(boxes.yaw[j])
    rel = p - boxes.center[j]
    lx = c * rel[:, 0] + s * rel[:, 1]
    ly = -s * rel[:, 0] + c * rel[:, 1]
    h = boxes.half[j]
    return (np.abs(lx) <= h[0]) & (np.abs(ly) <= h[1]) & (np.abs(rel[:, 2]) <= h[2])


def box_corners_xy(center_xy: np.ndarray, half_lw: np.ndarray, yaw: float) -> np.ndarray:
    """(4, 2) footprint corners of one yawed box."""
    c, s = np.cos(yaw), np.sin(yaw)
    loc = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]]) * half_lw
    return center_xy + loc @ np.array([[c, s], [-s, c]])
