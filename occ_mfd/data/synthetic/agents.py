"""Smooth agent tracks: lane routes through the road grid, sidewalk walks, and a speed controller.

A ``Track`` is a path (dense polyline, arc length ``s``, heading) and a speed profile on a fine time grid
(dt = 0.05 s): the controller accelerates to a cruise speed, slows for curvature (lateral acceleration
≤ 2.5 m/s²) and stops for a while at some junctions, with bounded acceleration, so position, heading
and velocity are continuous in time. ``s(t)`` is the trapezoidal integral of ``v(t)``, hence the reported
velocity is the true derivative of the position along the path.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from occ_mfd.data.synthetic.town import LANE_W, WALK_EDGE, WALK_LINE, Town

DT = 0.05
_DS = 0.25


@dataclass
class Path:
    """xy: (N, 2) points every 0.25 m; s: (N,) arc length; heading: (N,) unwrapped yaw; junctions: (K,) s."""

    xy: np.ndarray
    s: np.ndarray
    heading: np.ndarray
    junctions: np.ndarray

    @classmethod
    def from_points(cls, pts: np.ndarray, junction_pts: np.ndarray | None = None) -> "Path":
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        keep = np.concatenate([[True], seg > 1e-6])
        pts = pts[keep]
        s0 = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
        s = np.arange(0.0, s0[-1], _DS)
        xy = np.stack([np.interp(s, s0, pts[:, 0]), np.interp(s, s0, pts[:, 1])], axis=1)
        g = np.gradient(xy, axis=0)
        heading = np.unwrap(np.arctan2(g[:, 1], g[:, 0]))
        jn = np.zeros(0)
        if junction_pts is not None and len(junction_pts):
            d = np.linalg.norm(xy[None, :, :] - junction_pts[:, None, :], axis=2)
            jn = s[np.argmin(d, axis=1)]
        return cls(xy, s, heading, jn)

    @property
    def length(self) -> float:
        return float(self.s[-1])


@dataclass
class Track:
    """An agent's motion: ``path`` and on the fine grid ``t`` (T,), arc length ``sf`` (T,), speed ``vf`` (T,)."""

    path: Path
    t: np.ndarray
    sf: np.ndarray
    vf: np.ndarray

    def pose(self, t) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Times (M,) → xy (M, 2), yaw (M,), velocity (M, 2)."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        s = np.interp(t, self.t, self.sf)
        p = self.path
        xy = np.stack([np.interp(s, p.s, p.xy[:, 0]), np.interp(s, p.s, p.xy[:, 1])], axis=1)
        yaw = np.interp(s, p.s, p.heading)
        v = np.interp(t, self.t, self.vf)
        return xy, yaw, v[:, None] * np.stack([np.cos(yaw), np.sin(yaw)], axis=1)


def drive(path: Path, t: np.ndarray, rng: np.random.Generator, *, v_cruise: float, v0: float, s0: float,
          p_stop: float, a_max: float = 1.8, b_comf: float = 2.0, b_max: float = 4.0,
          a_lat: float = 2.5) -> Track:
    """Simulate the speed controller along ``path`` over the fine times ``t`` (T,)."""
    kappa = np.abs(np.gradient(path.heading, path.s))
    v_lim = np.minimum(v_cruise, np.sqrt(a_lat / np.maximum(kappa, 1e-6)))
    v_lim[-1] = 0.0  # the path's end is a stop for good
    for i in range(len(v_lim) - 2, -1, -1):  # backward pass: brake comfortably before slow parts
        v_lim[i] = min(v_lim[i], np.sqrt(v_lim[i + 1] ** 2 + 2 * b_comf * _DS))
    stops = [(s - 9.0, rng.uniform(1.0, 5.0)) for s in path.junctions if s - 9.0 > s0 + 15 and rng.random() < p_stop]
    sf, vf = np.zeros(len(t)), np.zeros(len(t))
    s, v, dwell = s0, min(v0, float(np.interp(s0, path.s, v_lim))), 0.0
    for k in range(len(t)):
        sf[k], vf[k] = s, v
        if dwell > 0:
            dwell -= DT
            if dwell <= 0:
                stops.pop(0)
            continue
        want = min(v_cruise, float(np.interp(s, path.s, v_lim)))
        if stops:
            gap = stops[0][0] - s
            want = min(want, np.sqrt(2 * b_comf * max(gap, 0.0)))
            if gap < 0.05 and v < 0.5:
                v, dwell = 0.0, stops[0][1]
                continue
        v_new = float(np.clip(want, max(v - b_max * DT, 0.0), v + a_max * DT))
        s = min(s + 0.5 * (v + v_new) * DT, path.length)
        v = v_new
    return Track(path, t, sf, vf)


# ------------------------------------------------------------------------------------------- routes

def _node(town: Town, n) -> np.ndarray:
    return np.array([town.xs[n[0]], town.ys[n[1]]])


def _neighbours(town: Town, n) -> list[tuple[int, int]]:
    nx, ny = len(town.xs), len(town.ys)
    out = []
    for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        i, j = n[0] + di, n[1] + dj
        if 0 <= i < nx and 0 <= j < ny:
            out.append((i, j))
    return out


def _is_corner(town: Town, n) -> bool:
    return n[0] in (0, len(town.xs) - 1) and n[1] in (0, len(town.ys) - 1)


def lane_route(town: Town, rng: np.random.Generator, start, heading_to, min_length: float) -> Path:
    """A random walk over the junctions (no U-turns) driven in the right-hand lane, turns as arcs."""
    nodes = [start, heading_to]
    total = np.linalg.norm(_node(town, heading_to) - _node(town, start))
    while total < min_length:
        prev, cur = nodes[-2], nodes[-1]
        opts = [n for n in _neighbours(town, cur) if n != prev]
        d_in = _node(town, cur) - _node(town, prev)
        straight = [n for n in opts if abs(np.cross(d_in, _node(town, n) - _node(town, cur))) < 1e-6]
        nxt = straight[0] if straight and rng.random() < 0.55 else opts[rng.integers(len(opts))]
        nodes.append(nxt)
        total += np.linalg.norm(_node(town, nxt) - _node(town, cur))
    o = LANE_W / 2
    pts = []
    for k in range(len(nodes) - 1):
        a, b = _node(town, nodes[k]), _node(town, nodes[k + 1])
        d = (b - a) / np.linalg.norm(b - a)
        r = np.array([d[1], -d[0]])
        if k == 0:
            pts.append(a + r * o)
        if k + 1 < len(nodes) - 1:
            c = _node(town, nodes[k + 2])
            d2 = (c - b) / np.linalg.norm(c - b)
            cross = d[0] * d2[1] - d[1] * d2[0]
            if abs(cross) < 1e-6:
                continue
            r2 = np.array([d2[1], -d2[0]])
            left = cross > 0
            if _is_corner(town, nodes[k + 1]):
                rad = town.corner_radius + (o if left else -o)
            else:
                rad = 10.0 if left else 6.5
            pa, pb = b + r * o, b + r2 * o
            p = pa + d * np.dot(pb - pa, d)
            st = p - d * rad
            centre = st + (-r if left else r) * rad
            a0 = np.arctan2(*(st - centre)[::-1])
            ang = a0 + (1 if left else -1) * np.linspace(0, np.pi / 2, 24)
            pts.extend(centre + rad * np.stack([np.cos(ang), np.sin(ang)], axis=1))
        else:
            pts.append(b + r * o)
    inner = np.array([_node(town, n) for n in nodes[1:-1] if not _is_corner(town, n)]).reshape(-1, 2)
    return Path.from_points(np.array(pts), inner)


def walk_route(town: Town, rng: np.random.Generator) -> Path:
    """A sidewalk walking line along one road, crossing the side streets at their crosswalks."""
    horizontal = rng.random() < 0.5
    lines, cross = (town.ys, town.xs) if horizontal else (town.xs, town.ys)
    i = rng.integers(len(lines))
    ring = i in (0, len(lines) - 1)
    trim = town.corner_radius + 2.0 if ring else WALK_EDGE + 2.0
    a, b = cross[0] + trim, cross[-1] - trim
    off = lines[i] + rng.choice([-1.0, 1.0]) * WALK_LINE
    u = np.array([a, b] if rng.random() < 0.5 else [b, a])
    pts = np.stack([u, np.full(2, off)], axis=1) if horizontal else np.stack([np.full(2, off), u], axis=1)
    return Path.from_points(pts)


def nearest_node(town: Town, xy: np.ndarray) -> tuple[int, int]:
    return int(np.argmin(np.abs(town.xs - xy[0]))), int(np.argmin(np.abs(town.ys - xy[1])))
