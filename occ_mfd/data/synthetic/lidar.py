"""A Velodyne HDL-32E-like LIDAR_TOP: a vectorised numpy ray caster over the world's primitives.

32 rings with elevations linearly spaced over [−30.67°, +10.67°] (ring 0 = lowest, as in nuScenes),
``azimuth_steps`` rays per ring (nuScenes: 1084). A ray returns the nearest hit among the ground (the plane
z = 0, or the hills' height field ``Scene.terrain``; class from the town raster), boxes, cylinders, spheres
and ``Scene.local_boxes`` (solids given in another frame, e.g. the ego body in the tilted ego frame on
hills, where a world-upright box would not ride with the car); rays with no hit within ``max_range``
(sky) or a hit closer than ``min_range`` return nothing. The whole spin is cast from one pose: motion
during the 50 ms spin is ignored (nuScenes' ego-motion de-skewing would undo most of it anyway).

Speed: each primitive's bounding sphere, seen from the sensor, covers an azimuth interval
(± asin(r / d_xy)) and an elevation interval (± asin(r / d)); boxes get tighter intervals from their
corners (``_box_angles``). Only the rays inside both are tested (pairs generated with ``np.repeat``),
then a sort picks the nearest hit per ray. Rays hitting the own body (label 31) return with
probability ``ego_return_prob`` (real sweeps keep only part of those close returns).
Intensity = class reflectivity × 255 / (1 + (r / 25 m)²) + noise, clipped to 0–255 (a rough falloff).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from occ_mfd.data.synthetic.geometry import Boxes, Cylinders, Spheres, ray_box, ray_cylinder, ray_sphere

EGO_LABEL, NOISE_LABEL = 31, 0
#: Rough reflectivity per lidarseg id (0–1); unknown ids → 0.3.
REFLECTIVITY = {24: 0.08, 25: 0.12, 26: 0.15, 27: 0.2, 28: 0.35, 30: 0.25, 17: 0.5, 23: 0.5, 16: 0.5,
                22: 0.45, 18: 0.5, 21: 0.55, 14: 0.4, 2: 0.3, 9: 0.7, 12: 0.9, 31: 0.1}


@dataclass(frozen=True)
class LidarModel:
    """Beam pattern and noise of the simulated sensor."""

    rings: int = 32
    elev_lo_deg: float = -30.67
    elev_hi_deg: float = 10.67
    azimuth_steps: int = 1084
    max_range: float = 70.0
    min_range: float = 0.5
    range_noise: float = 0.02
    noise_fraction: float = 0.001  # spurious returns, labelled 0 (noise)
    ego_return_prob: float = 0.3   # many rays hitting the own body are lost (close-range gating)

    def elevations(self) -> np.ndarray:
        return np.radians(np.linspace(self.elev_lo_deg, self.elev_hi_deg, self.rings))

    def directions(self) -> np.ndarray:
        """(rings · azimuth_steps, 3) unit directions in the sensor frame; index = ring · steps + az."""
        el = self.elevations()[:, None]
        az = (np.arange(self.azimuth_steps) * 2 * np.pi / self.azimuth_steps)[None, :]
        d = np.stack(np.broadcast_arrays(np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)), -1)
        return d.reshape(-1, 3)


@dataclass
class Scene:
    """What one spin sees: static and dynamic primitives (global frame) and a ground-class lookup.

    ``terrain``: a ``terrain.Terrain`` (None or flat: the plane z = 0). ``local_boxes``: boxes given in the
    frame ``sensor2local`` maps the sensor into (both or neither)."""

    boxes: Boxes
    cylinders: Cylinders
    spheres: Spheres
    ground_class: object  # callable (N, 2) xy → (N,) uint8
    terrain: object = None
    local_boxes: Boxes | None = None
    sensor2local: np.ndarray | None = None


def _box_angles(g2s: np.ndarray, boxes: Boxes):
    """Angular intervals (sensor frame) of each box from its 8 corners → (az_lo, az_hi), (el_lo, el_hi).

    A convex solid seen from outside its vertical prism spans the azimuths of its extreme corners; boxes
    around the sensor's vertical get (−π, π). Much tighter than the bounding sphere for long walls.
    Elevation: a box wholly below the sensor (top z_max < 0) is seen at most at atan2(z_max, d_max),
    d_max its farthest corner's horizontal distance (the own body, cars); likewise for boxes above.
    """
    sgn = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
    c, s = np.cos(boxes.yaw), np.sin(boxes.yaw)
    loc = sgn[None] * boxes.half[:, None, :]                            # (P, 8, 3)
    glob = np.stack([c[:, None] * loc[..., 0] - s[:, None] * loc[..., 1],
                     s[:, None] * loc[..., 0] + c[:, None] * loc[..., 1], loc[..., 2]], -1) + boxes.center[:, None]
    sen = glob @ g2s[:3, :3].T + g2s[:3, 3]
    az = np.arctan2(sen[..., 1], sen[..., 0])
    ref = az[:, :1]
    delta = (az - ref + np.pi) % (2 * np.pi) - np.pi
    lo, hi = ref[:, 0] + delta.min(1), ref[:, 0] + delta.max(1)
    # Sensor inside the footprint (or nearly): no azimuth culling.
    o = g2s[:3, :3].T @ -g2s[:3, 3]                                     # sensor position, global
    rel = o[:2] - boxes.center[:, :2]
    lx, ly = c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1]
    around = (np.abs(lx) < boxes.half[:, 0] + 1.0) & (np.abs(ly) < boxes.half[:, 1] + 1.0)
    around |= (hi - lo) > np.pi
    lo[around], hi[around] = -np.pi, 3 * np.pi
    zmin, zmax = sen[..., 2].min(1), sen[..., 2].max(1)
    dmax = np.hypot(sen[..., 0], sen[..., 1]).max(1)
    el_hi = np.where(zmax < 0, np.arctan2(zmax, dmax), np.pi / 2)
    el_lo = np.where(zmin > 0, np.arctan2(zmin, dmax), -np.pi / 2)
    return (lo, hi), (el_lo, el_hi)


def _candidate_pairs(model: LidarModel, sensor2global: np.ndarray, centres: np.ndarray, radii: np.ndarray,
                     angles=None):
    """Rays that may hit each bounding sphere (optionally within the tighter ``angles`` of
    ``_box_angles``): → (ray index (M,), primitive index (M,))."""
    g2s = np.linalg.inv(sensor2global)
    c = centres @ g2s[:3, :3].T + g2s[:3, 3]                          # (P, 3) sensor frame
    dxy = np.hypot(c[:, 0], c[:, 1])
    d = np.linalg.norm(c, axis=1)
    keep = d - radii < model.max_range
    K, R = model.azimuth_steps, model.rings
    step = 2 * np.pi / K
    el = model.elevations()
    el_step = el[1] - el[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        half_az = np.where(dxy > radii, np.arcsin(np.minimum(radii / dxy, 1.0)), np.pi)
        half_el = np.where(d > radii, np.arcsin(np.minimum(radii / d, 1.0)), np.pi)
    az = np.arctan2(c[:, 1], c[:, 0])
    ec = np.arctan2(c[:, 2], dxy)
    k0 = np.floor((az - half_az) / step).astype(np.int64) - 1
    k1 = np.ceil((az + half_az) / step).astype(np.int64) + 1
    e_lo, e_hi = ec - half_el, ec + half_el
    if angles is not None:
        (a_lo, a_hi), (b_lo, b_hi) = angles
        k0 = np.floor(a_lo / step).astype(np.int64) - 1
        k1 = np.ceil(a_hi / step).astype(np.int64) + 1
        e_lo, e_hi = np.maximum(e_lo, b_lo), np.minimum(e_hi, b_hi)
    full = (half_az >= np.pi / 2) | (k1 - k0 + 1 >= K)
    k0[full], k1[full] = 0, K - 1
    ncol = np.minimum(k1 - k0 + 1, K)
    r0 = np.clip(np.floor((e_lo - el[0]) / el_step).astype(np.int64), 0, R - 1)
    r1 = np.clip(np.ceil((e_hi - el[0]) / el_step).astype(np.int64), 0, R - 1)
    nrow = np.where(keep & (e_hi >= el[0] - el_step) & (e_lo <= el[-1] + el_step), r1 - r0 + 1, 0)
    n = ncol * nrow
    prim = np.repeat(np.arange(len(radii)), n)
    j = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    nc = ncol[prim]
    ring = r0[prim] + j // nc
    col = (k0[prim] + j % nc) % K
    return ring * K + col, prim


def cast(model: LidarModel, sensor2global: np.ndarray, scene: Scene, rng: np.random.Generator,
         dirs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One spin. Returns points (N, 5) float32 (x, y, z, intensity, ring) in the sensor frame and
    labels (N,) uint8 lidarseg ids."""
    d_s = model.directions() if dirs is None else dirs                 # (R, 3) sensor frame
    d_g = d_s @ sensor2global[:3, :3].T                                 # (R, 3) global frame
    o = sensor2global[:3, 3]
    n_rays = len(d_s)
    t_best = np.full(n_rays, np.inf)
    lab = np.zeros(n_rays, np.uint8)
    if scene.terrain is None or scene.terrain.is_flat:  # ground plane z = 0
        down = d_g[:, 2] < -1e-9
        t_best[down] = -o[2] / d_g[down, 2]
    else:
        t_best = scene.terrain.intersect(o, d_g, model.max_range + 1.0)
    passes = [(prims, fn, sensor2global, o, d_g) for prims, fn in
              ((scene.boxes, ray_box), (scene.cylinders, ray_cylinder), (scene.spheres, ray_sphere))]
    if scene.local_boxes is not None and len(scene.local_boxes):
        s2l = scene.sensor2local
        passes.append((scene.local_boxes, ray_box, s2l, s2l[:3, 3], d_s @ s2l[:3, :3].T))
    for prims, fn, s2f, o_f, d_f in passes:
        if len(prims) == 0:
            continue
        az = _box_angles(np.linalg.inv(s2f), prims) if isinstance(prims, Boxes) else None
        ray, prim = _candidate_pairs(model, s2f, *prims.bounding_spheres(), az)
        if len(ray) == 0:
            continue
        t = fn(o_f, d_f[ray], prims, prim)
        hit = t < t_best[ray]
        ray, prim, t = ray[hit], prim[hit], t[hit]
        order = np.lexsort((t, ray))                                    # nearest hit per ray first
        ray, prim, t = ray[order], prim[order], t[order]
        first = np.concatenate([[True], ray[1:] != ray[:-1]])
        ray, prim, t = ray[first], prim[first], t[first]
        t_best[ray] = t
        lab[ray] = prims.label[prim]
    ground = np.isfinite(t_best) & (lab == 0)
    lab[ground] = scene.ground_class(o[None, :2] + t_best[ground, None] * d_g[ground, :2])
    ok = (t_best >= model.min_range) & (t_best <= model.max_range)
    ok &= (lab != EGO_LABEL) | (rng.random(n_rays) < model.ego_return_prob)
    idx = np.flatnonzero(ok)
    r = t_best[idx] + rng.normal(0.0, model.range_noise, len(idx))
    labels = lab[idx]
    # Spurious returns: random rays, random range, labelled noise.
    n_noise = rng.binomial(n_rays, model.noise_fraction)
    if n_noise:
        extra = rng.integers(0, n_rays, n_noise)
        idx = np.concatenate([idx, extra])
        r = np.concatenate([r, rng.uniform(model.min_range, 30.0, n_noise)])
        labels = np.concatenate([labels, np.full(n_noise, NOISE_LABEL, np.uint8)])
    refl = np.array([REFLECTIVITY.get(int(k), 0.3) for k in range(32)])[labels]
    inten = np.clip(refl * 255 / (1 + (r / 25.0) ** 2) + rng.normal(0, 2.0, len(r)), 0, 255)
    xyz = d_s[idx] * r[:, None]
    pts = np.concatenate([xyz, np.round(inten)[:, None], (idx // model.azimuth_steps)[:, None]], axis=1)
    order = np.argsort(idx, kind="stable")
    return pts[order].astype(np.float32), labels[order]
