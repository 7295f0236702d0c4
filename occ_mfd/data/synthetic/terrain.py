"""Terrain of the synthetic world: flat (z = 0) or hills, a height field built like a road's vertical profile.

``h(x, y) = p(x) + q(y)`` (global frame, metres), each term a :class:`Profile`: its *grade* (slope dh/ds)
is given at knots, varies linearly between knots (a road designer's "vertical curve") and stays constant
beyond the first and last knot; the height is the grade's integral with ``h = 0`` at the first knot. So a
profile is piecewise quadratic, continuous with a continuous slope, and every height and grade can be
computed by hand: knots (0, 10, 110, 120) with grades (0, 0.08, 0.08, 0) give h(10) = 10·0.04 = 0.4,
h(60) = 0.4 + 50·0.08 = 4.4, h(110) = 8.4, h(200) = 8.4 + 10·0.04 = 8.8.

:func:`hills` draws a town's profiles: stretches of constant grade (ramps, up to ``max_grade`` = 8 % along
x, 6 % along y) joined by 15–30 m vertical curves, the grade's sign alternating so the profile climbs to
crests and falls into valleys, with level stretches in between. The world simulator drapes the town on it
(``drape``) and the LiDAR and the exact truth see the true 3-D geometry; the ego rides the surface
(:meth:`Terrain.pose`: origin on the ground, z along the surface normal, x along the heading).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from occ_mfd.data.synthetic.geometry import Boxes, Cylinders, Spheres

FLAT, HILLS = "flat", "hills"
TERRAINS = (FLAT, HILLS)


@dataclass(frozen=True)
class Profile:
    """A 1-D height profile: ``grades[i]`` = dh/ds at ``knots[i]`` (strictly increasing); none → level."""

    knots: tuple = ()
    grades: tuple = ()

    def __post_init__(self):
        k = np.asarray(self.knots, float)
        if len(k) != len(self.grades) or len(k) == 1 or (len(k) and np.any(np.diff(k) <= 0)):
            raise ValueError(f"Profile: need ≥ 2 strictly increasing knots with one grade each, got "
                             f"{self.knots} / {self.grades}")

    @property
    def is_flat(self) -> bool:
        return not self.knots or not np.any(np.asarray(self.grades, float))

    def grade(self, s) -> np.ndarray:
        s = np.asarray(s, dtype=np.float64)
        if not self.knots:
            return np.zeros_like(s)
        return np.interp(s, self.knots, self.grades)

    def height(self, s) -> np.ndarray:
        """∫ grade from the first knot to ``s`` (exact: the trapezoid rule is exact for a linear grade)."""
        s = np.asarray(s, dtype=np.float64)
        if not self.knots:
            return np.zeros_like(s)
        k, g = np.asarray(self.knots, float), np.asarray(self.grades, float)
        cum = np.concatenate([[0.0], np.cumsum(np.diff(k) * (g[:-1] + g[1:]) / 2)])
        j = np.clip(np.searchsorted(k, s, side="right") - 1, 0, len(k) - 1)
        return cum[j] + (s - k[j]) * (g[j] + self.grade(s)) / 2


@dataclass(frozen=True)
class Terrain:
    """``h(x, y) = px(x) + py(y)``; both profiles empty = the flat world (ground plane z = 0)."""

    px: Profile = field(default_factory=Profile)
    py: Profile = field(default_factory=Profile)
    kind: str = FLAT

    @property
    def is_flat(self) -> bool:
        return self.px.is_flat and self.py.is_flat

    def height(self, xy) -> np.ndarray:
        """(..., 2) global xy → (...) ground height."""
        xy = np.asarray(xy, dtype=np.float64)
        return self.px.height(xy[..., 0]) + self.py.height(xy[..., 1])

    def gradient(self, xy) -> np.ndarray:
        """(..., 2) → (..., 2) (∂h/∂x, ∂h/∂y)."""
        xy = np.asarray(xy, dtype=np.float64)
        return np.stack([self.px.grade(xy[..., 0]), self.py.grade(xy[..., 1])], -1)

    def pose(self, xy, yaw: float) -> np.ndarray:
        """(4, 4) ego2global of a car standing at ``xy`` heading ``yaw``: origin on the ground, z along the
        surface normal, x along the heading projected onto the surface (its horizontal direction is ``yaw``)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(2)
        gx, gy = self.gradient(xy)
        u = np.array([np.cos(yaw), np.sin(yaw)])
        f = np.array([u[0], u[1], u @ (gx, gy)])
        f /= np.linalg.norm(f)
        n = np.array([-gx, -gy, 1.0])
        n /= np.linalg.norm(n)
        m = np.eye(4)
        m[:3, :3] = np.stack([f, np.cross(n, f), n], axis=1)
        m[:3, 3] = (xy[0], xy[1], float(self.height(xy)))
        return m

    @property
    def max_slope(self) -> float:
        """An upper bound of |∇h| (the profiles' largest grades combined)."""
        gx = max((abs(g) for g in self.px.grades), default=0.0)
        gy = max((abs(g) for g in self.py.grades), default=0.0)
        return float(np.hypot(gx, gy))

    def intersect(self, o: np.ndarray, d: np.ndarray, max_range: float, step: float = 0.5,
                  iters: int = 16) -> np.ndarray:
        """First hit of rays ``o + t·d`` (o: (3,), d: (N, 3) unit) with the surface, ``inf`` where none
        within ``max_range``: march in ``step`` metres to the first sign change of z − h, then Newton's
        method kept inside that bracket (bisection where a step would leave it), to well under 0.1 mm.

        A ray falling faster than the steepest slope must be under the surface once it has dropped the
        origin's height above the ground: its march stops there (most rays of a spin hit within metres)."""
        o = np.asarray(o, dtype=np.float64)
        d = np.asarray(d, dtype=np.float64)
        clear = float(o[2] - self.height(o[:2]))
        fall = -d[:, 2] - self.max_slope * np.hypot(d[:, 0], d[:, 1])
        with np.errstate(divide="ignore"):
            t_end = np.where(fall > 1e-9, clear / np.maximum(fall, 1e-9) + step, max_range)
        t_end = np.minimum(t_end, max_range)
        out = np.full(len(d), np.inf)
        if clear <= 0:
            return out
        order = np.argsort(t_end, kind="stable")
        for s in range(0, len(d), 4096):
            sel = order[s:s + 4096]
            ts = np.arange(0.0, t_end[sel].max() + step, step)
            dd = d[sel]
            pxy = o[None, None, :2] + ts[None, :, None] * dd[:, None, :2]              # (n, T, 2)
            gap = (o[2] + ts[None, :] * dd[:, 2:3]) - self._height_fast(pxy)
            cross = (gap[:, :-1] > 0) & (gap[:, 1:] <= 0)
            hit = cross.any(1)
            j = np.argmax(cross, 1)[hit]
            lo, hi = ts[j], ts[j + 1]
            dh = dd[hit]
            g_lo, g_hi = gap[hit, j], gap[hit, j + 1]
            t_hit = lo + (hi - lo) * g_lo / np.maximum(g_lo - g_hi, 1e-12)          # secant start in the bracket
            for _ in range(iters):                                                 # safeguarded Newton
                q = o + t_hit[:, None] * dh
                g = q[:, 2] - self.height(q[:, :2])
                lo, hi = np.where(g > 0, t_hit, lo), np.where(g > 0, hi, t_hit)
                slope = dh[:, 2] - np.einsum("ij,ij->i", self.gradient(q[:, :2]), dh[:, :2])
                with np.errstate(divide="ignore", invalid="ignore"):
                    nxt = t_hit - g / slope
                bad = ~((nxt > lo) & (nxt < hi))
                nxt[bad] = (lo[bad] + hi[bad]) / 2
                if np.all(np.abs(nxt - t_hit) < 1e-8):
                    t_hit = nxt
                    break
                t_hit = nxt
            out[sel[hit]] = np.where(t_hit <= max_range, t_hit, np.inf)
        return out

    @cached_property
    def _tables(self):
        """Heights every 5 cm over [−200, 600] m per profile, for the march (linear between samples: off by
        at most curvature·(5 cm)²/8 < 1e-5 m; hits are then refined on the exact surface)."""
        s = np.arange(-200.0, 600.0 + 1e-9, 0.05)
        return s[0], 0.05, self.px.height(s), self.py.height(s)

    def _height_fast(self, xy: np.ndarray) -> np.ndarray:
        s0, ds, hx, hy = self._tables
        out = np.zeros(xy.shape[:-1])
        for a, tab in ((0, hx), (1, hy)):
            u = (xy[..., a] - s0) / ds
            i = np.clip(np.floor(u).astype(np.int64), 0, len(tab) - 2)
            f = u - i
            out += tab[i] + f * (tab[i + 1] - tab[i])
        return out

    def describe(self) -> dict:
        """JSON-able form (the truth index records it per scene); :meth:`from_dict` reads it back."""
        return {"kind": self.kind, "px": {"knots": list(self.px.knots), "grades": list(self.px.grades)},
                "py": {"knots": list(self.py.knots), "grades": list(self.py.grades)}}

    @classmethod
    def from_dict(cls, d: dict) -> "Terrain":
        prof = lambda e: Profile(tuple(e["knots"]), tuple(e["grades"]))  # noqa: E731
        return cls(prof(d["px"]), prof(d["py"]), d.get("kind", HILLS))


def _profile(rng: np.random.Generator, lo: float, hi: float, max_grade: float) -> Profile:
    knots, grades, s, g = [], [], lo, 0.0
    sign = 1.0 if rng.random() < 0.5 else -1.0
    while s < hi:
        hold = rng.uniform(15.0, 45.0)                    # a ramp (or level stretch) of constant grade
        knots += [s, s + hold]
        grades += [g, g]
        s += hold + rng.uniform(15.0, 30.0)               # a vertical curve to the next grade
        if g != 0.0 and rng.random() < 0.25:
            g = 0.0                                       # level out (a plateau or the valley floor)
        else:
            g = sign * rng.uniform(0.4, 1.0) * max_grade  # alternating signs: crests and valleys
            sign = -sign
    knots.append(s)
    grades.append(g)
    return Profile(tuple(float(v) for v in knots), tuple(float(v) for v in grades))


def hills(rng: np.random.Generator, size: float = 400.0, max_grade: tuple = (0.08, 0.06)) -> Terrain:
    """A random hilly terrain over the town ``[0, size]²`` (see the module docstring)."""
    return Terrain(_profile(rng, -60.0, size + 60.0, max_grade[0]), _profile(rng, -60.0, size + 60.0, max_grade[1]),
                   HILLS)


def make_terrain(kind: str, seed: int) -> Terrain:
    """``"flat"`` → the plane z = 0; ``"hills"`` → :func:`hills` from its own stream of ``seed`` (the town, the
    agents and the LiDAR noise keep drawing from the scene's stream, so the same seed gives the same town)."""
    if kind == FLAT:
        return Terrain()
    if kind == HILLS:
        return hills(np.random.default_rng([int(seed), 0x4811]))
    raise ValueError(f"terrain must be one of {TERRAINS}, got {kind!r}")


def drape(boxes, cylinders, spheres, terrain: Terrain):
    """The town's static solids (built on z = 0) set on the terrain: a box spans from the lowest ground under
    its footprint to its height above the highest (its top stays level, so no part of it is buried); a
    cylinder starts 5 cm below the ground at its axis; a sphere is lifted by the ground height at its centre.
    Returns new (Boxes, Cylinders, Spheres); the flat terrain returns the inputs unchanged."""
    if terrain.is_flat:
        return boxes, cylinders, spheres
    c, s = np.cos(boxes.yaw), np.sin(boxes.yaw)
    sgn = np.array([[0, 0], [1, 1], [1, -1], [-1, -1], [-1, 1]], float)            # centre + 4 corners
    loc = sgn[None] * boxes.half[:, None, :2]
    xy = np.stack([c[:, None] * loc[..., 0] - s[:, None] * loc[..., 1],
                   s[:, None] * loc[..., 0] + c[:, None] * loc[..., 1]], -1) + boxes.center[:, None, :2]
    h = terrain.height(xy)
    bottom, top = h.min(1), h.max(1) + 2 * boxes.half[:, 2]
    center = np.concatenate([boxes.center[:, :2], ((bottom + top) / 2)[:, None]], 1)
    half = np.concatenate([boxes.half[:, :2], ((top - bottom) / 2)[:, None]], 1)
    hc = terrain.height(cylinders.xy)
    hs = terrain.height(spheres.center[:, :2])
    return (Boxes(center, half, boxes.yaw.copy(), boxes.label.copy()),
            Cylinders(cylinders.xy.copy(), cylinders.radius.copy(), hc + cylinders.z0 - 0.05, hc + cylinders.z1,
                      cylinders.label.copy()),
            Spheres(spheres.center + np.stack([np.zeros_like(hs), np.zeros_like(hs), hs], 1), spheres.radius.copy(),
                    spheres.label.copy()))
