"""A procedural town: a road grid with a curved ring road, sidewalks, blocks, and its ground raster.

Layout (global frame, metres; the town covers x, y ∈ [0, SIZE]):
- roads on a jittered grid ``xs`` × ``ys`` (4–5 lines per axis); the outermost lines form a ring road
  whose four corners are quarter circles of radius ``corner_radius`` (the curves);
- every road is two-way, right-hand traffic: per direction one driving lane (LANE_W) and one parking lane
  (PARK_W) → road half-width ROAD_HALF; sidewalks SIDEWALK_W wide on both sides;
- blocks between roads hold buildings and walls (manmade), parks (terrain, trees, hedges), or parking
  lots (flat.other); the sidewalks hold poles and trees mid-block; the parking lanes hold parked
  vehicles, barriers and traffic cones (listed in ``Town.parked``, annotated later as agents).

The ground raster ``Town.ground`` holds nuScenes-lidarseg ids (24 driveable, 25 flat.other,
26 sidewalk, 27 terrain) at ``RES`` = 0.1 m (10 px/m, like nuScenes maps) in image layout, with the
global origin at the bottom-left corner like the devkit's ``MapMask``: pixel (row, col) covers
x ∈ [col·RES, (col+1)·RES), y ∈ [SIZE − (row+1)·RES, SIZE − row·RES).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from occ_mfd.data.synthetic.geometry import Boxes, Cylinders, Spheres, box_corners_xy, concat_boxes, make_boxes

SIZE = 400.0
RES = 0.1
LANE_W, PARK_W, SIDEWALK_W = 3.75, 2.5, 4.0
ROAD_HALF = LANE_W + PARK_W            # 6.25 m: centreline → curb
WALK_EDGE = ROAD_HALF + SIDEWALK_W      # 10.25 m: centreline → block edge
WALK_LINE = ROAD_HALF + 1.5             # where pedestrians walk (and cross streets)
DRIVEABLE, FLAT_OTHER, SIDEWALK, TERRAIN = 24, 25, 26, 27
MANMADE, VEGETATION = 28, 30


@dataclass
class ParkedObject:
    """A static annotated object: nuScenes category, (x, y) centre, yaw, (w, l, h)."""

    category: str
    xy: np.ndarray
    yaw: float
    size: np.ndarray


@dataclass
class Town:
    """The static world. ``ground``: (H, W) uint8 lidarseg ids (see module doc for the pixel frame)."""

    xs: np.ndarray                 # (nx,) x of the north–south roads
    ys: np.ndarray                 # (ny,) y of the east–west roads
    corner_radius: float
    ground: np.ndarray
    road_dist: np.ndarray          # (H, W) float32 distance to the nearest road centreline
    boxes: Boxes
    cylinders: Cylinders
    spheres: Spheres
    parked: list[ParkedObject] = field(default_factory=list)

    def ground_class(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) global xy → (N,) uint8 lidarseg ground id; terrain outside the map."""
        col, row = _pixel(xy)
        h, w = self.ground.shape
        ok = (row >= 0) & (row < h) & (col >= 0) & (col < w)
        out = np.full(len(xy), TERRAIN, np.uint8)
        out[ok] = self.ground[row[ok], col[ok]]
        return out

    def clear_of_roads(self, pts: np.ndarray, margin: float) -> bool:
        """Whether every (N, 2) point lies inside a block (beyond the sidewalk by ``margin``) and the map."""
        col, row = _pixel(pts)
        h, w = self.road_dist.shape
        if np.any((row < 0) | (row >= h) | (col < 0) | (col >= w)):
            return False
        return bool(np.all(self.road_dist[row, col] > WALK_EDGE + margin))


def _pixel(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    n = int(round(SIZE / RES))
    col = np.floor(xy[:, 0] / RES).astype(np.int64)
    row = n - 1 - np.floor(xy[:, 1] / RES).astype(np.int64)
    return col, row


def _road_distance(xs, ys, rc) -> np.ndarray:
    """(H, W) float32 distance of each pixel centre to the nearest road centreline (segments + arcs)."""
    n = int(round(SIZE / RES))
    dist = np.full((n, n), np.inf, np.float32)
    reach = WALK_EDGE + 1.0

    def window(x0, x1, y0, y1):
        c0, c1 = max(int((x0 - reach) / RES), 0), min(int((x1 + reach) / RES) + 1, n)
        r0, r1 = max(n - 1 - int((y1 + reach) / RES), 0), min(n - int((y0 - reach) / RES), n)
        px = ((np.arange(c0, c1) + 0.5) * RES)[None, :]
        py = ((n - 1 - np.arange(r0, r1) + 0.5) * RES)[:, None]
        return (slice(r0, r1), slice(c0, c1)), px, py

    def seg(x0, y0, x1, y1):  # axis-aligned segment
        sl, px, py = window(min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1))
        dx = np.maximum(np.maximum(min(x0, x1) - px, px - max(x0, x1)), 0)
        dy = np.maximum(np.maximum(min(y0, y1) - py, py - max(y0, y1)), 0)
        dist[sl] = np.minimum(dist[sl], np.hypot(dx, dy))

    x_lo, x_hi, y_lo, y_hi = xs[0], xs[-1], ys[0], ys[-1]
    for x in xs:  # north–south roads; the ring's sides stop where the corner arcs begin
        trim = rc if x in (x_lo, x_hi) else 0.0
        seg(x, y_lo + trim, x, y_hi - trim)
    for y in ys:
        trim = rc if y in (y_lo, y_hi) else 0.0
        seg(x_lo + trim, y, x_hi - trim, y)
    for cx, cy, sx, sy in _corner_arcs(xs, ys, rc):
        sl, px, py = window(min(cx, cx + sx * rc), max(cx, cx + sx * rc), min(cy, cy + sy * rc),
                            max(cy, cy + sy * rc))
        in_quad = ((px - cx) * sx >= 0) & ((py - cy) * sy >= 0)
        d = np.abs(np.hypot(px - cx, py - cy) - rc)
        dist[sl] = np.where(in_quad, np.minimum(dist[sl], d), dist[sl])
    return dist


def _corner_arcs(xs, ys, rc):
    """(centre x, centre y, sign x, sign y) of the ring road's four quarter-circle corners."""
    out = []
    for x, sx in ((xs[0], -1), (xs[-1], 1)):
        for y, sy in ((ys[0], -1), (ys[-1], 1)):
            out.append((x - sx * rc, y - sy * rc, sx, sy))
    return out


class _Builder:
    """Accumulates static primitives while filling blocks and sidewalks."""

    def __init__(self, town_dist, rng):
        self.dist, self.rng = town_dist, rng
        self.boxes: list[Boxes] = []
        self.cyl = {k: [] for k in ("xy", "radius", "z0", "z1", "label")}
        self.sph = {k: [] for k in ("center", "radius", "label")}

    def clear(self, corners: np.ndarray, margin: float) -> bool:
        # Sample the footprint outline every metre: the curved corners make blocks non-rectangular.
        pts = [corners]
        for a, b in zip(corners, np.roll(corners, -1, axis=0)):
            k = max(int(np.hypot(*(b - a))), 1)
            pts.append(a + (b - a) * np.linspace(0, 1, k + 1)[:, None])
        pts = np.concatenate(pts)
        col, row = _pixel(pts)
        n = self.dist.shape[0]
        ok = (row >= 0) & (row < n) & (col >= 0) & (col < n)
        return bool(np.all(ok) and np.all(self.dist[row, col] > WALK_EDGE + margin))

    def box(self, cx, cy, w, l, h, yaw, label, margin=0.5) -> bool:
        corners = box_corners_xy(np.array([cx, cy]), np.array([l / 2, w / 2]), yaw)
        if not self.clear(corners, margin):
            return False
        self.boxes.append(make_boxes([cx, cy, h / 2], [w, l, h], yaw, label))
        return True

    def tree(self, x, y, in_block=True):
        r_crown = self.rng.uniform(1.5, 2.4)
        z_crown = self.rng.uniform(2.6, 4.0) + r_crown
        if in_block and not self.clear(np.array([[x - r_crown, y - r_crown], [x + r_crown, y - r_crown],
                                                 [x + r_crown, y + r_crown], [x - r_crown, y + r_crown]]), 0.0):
            return
        for k, v in zip(("xy", "radius", "z0", "z1", "label"), ((x, y), self.rng.uniform(0.15, 0.3), 0.0,
                                                               z_crown, VEGETATION)):
            self.cyl[k].append(v)
        for k, v in zip(("center", "radius", "label"), ((x, y, z_crown), r_crown, VEGETATION)):
            self.sph[k].append(v)

    def pole(self, x, y):
        for k, v in zip(("xy", "radius", "z0", "z1", "label"), ((x, y), 0.15, 0.0, self.rng.uniform(5, 9), MANMADE)):
            self.cyl[k].append(v)

    def result(self):
        cyl = Cylinders(np.array(self.cyl["xy"], float).reshape(-1, 2), *(np.array(self.cyl[k], float)
                                                                          for k in ("radius", "z0", "z1")),
                        np.array(self.cyl["label"], np.uint8))
        sph = Spheres(np.array(self.sph["center"], float).reshape(-1, 3), np.array(self.sph["radius"], float),
                      np.array(self.sph["label"], np.uint8))
        return concat_boxes(self.boxes), cyl, sph


def _fill_block(b: _Builder, ground: np.ndarray, x0, x1, y0, y1, kind: str):
    """Fill the block interior [x0, x1] × [y0, y1] (already inset from the sidewalks)."""
    rng = b.rng
    if x1 - x0 < 8 or y1 - y0 < 8:
        return
    if kind == "buildings":
        x = x0 + rng.uniform(1, 3)
        while x < x1 - 6:
            w = min(rng.uniform(12, 30), x1 - 1 - x)
            y = y0 + rng.uniform(1, 3)
            while y < y1 - 6:
                d = min(rng.uniform(10, 28), y1 - 1 - y)
                if rng.random() < 0.85:
                    b.box(x + w / 2, y + d / 2, d, w, rng.uniform(6, 30), 0.0, MANMADE)
                else:  # a walled yard with a tree
                    b.box(x + w / 2, y + 0.15, 0.3, w, rng.uniform(1.5, 2.5), 0.0, MANMADE)
                    b.tree(x + w / 2, y + d / 2)
                y += d + rng.uniform(2, 6)
            x += w + rng.uniform(2, 6)
    elif kind == "park":
        for _ in range(int((x1 - x0) * (y1 - y0) / 120)):
            b.tree(rng.uniform(x0 + 2, x1 - 2), rng.uniform(y0 + 2, y1 - 2))
        for _ in range(rng.integers(2, 6)):  # hedges along the block edges
            if rng.random() < 0.5:
                l = rng.uniform(6, 20)
                b.box(rng.uniform(x0 + l / 2, max(x1 - l / 2, x0 + l / 2 + 0.1)), rng.choice([y0 + 1, y1 - 1]),
                      1.0, l, rng.uniform(0.8, 1.6), 0.0, VEGETATION)
            else:
                l = rng.uniform(6, 20)
                b.box(rng.choice([x0 + 1, x1 - 1]), rng.uniform(y0 + l / 2, max(y1 - l / 2, y0 + l / 2 + 0.1)),
                      1.0, l, rng.uniform(0.8, 1.6), np.pi / 2, VEGETATION)
    elif kind == "parking":
        # A paved lot (flat.other) with a low wall on one side; parked cars are added as agents.
        c0, c1 = int(x0 / RES), int(x1 / RES)
        n = ground.shape[0]
        r0, r1 = n - int(y1 / RES), n - int(y0 / RES)
        sub = ground[r0:r1, c0:c1]
        sub[sub == TERRAIN] = FLAT_OTHER
        b.box((x0 + x1) / 2, y1 - 0.5, 0.3, x1 - x0 - 2, 1.2, 0.0, MANMADE)


def build_town(rng: np.random.Generator) -> Town:
    """A new random town; every random choice comes from ``rng``."""
    nx, ny = rng.integers(4, 6), rng.integers(4, 6)
    lo, hi = 50.0, SIZE - 50.0
    xs = np.linspace(lo, hi, nx)
    ys = np.linspace(lo, hi, ny)
    xs[1:-1] += rng.uniform(-8, 8, nx - 2)
    ys[1:-1] += rng.uniform(-8, 8, ny - 2)
    rc = float(rng.uniform(20, 32))
    dist = _road_distance(xs, ys, rc)
    ground = np.full(dist.shape, TERRAIN, np.uint8)
    ground[dist < WALK_EDGE] = SIDEWALK
    ground[dist < ROAD_HALF] = DRIVEABLE
    b = _Builder(dist, rng)
    parked: list[ParkedObject] = []

    # Blocks: between consecutive roads, plus the outskirts beyond the ring road.
    ex = np.concatenate([[0.0 - WALK_EDGE], xs, [SIZE + WALK_EDGE]])
    ey = np.concatenate([[0.0 - WALK_EDGE], ys, [SIZE + WALK_EDGE]])
    for i in range(len(ex) - 1):
        for j in range(len(ey) - 1):
            outskirts = i in (0, len(ex) - 2) or j in (0, len(ey) - 2)
            kind = rng.choice(["buildings", "park", "parking"], p=[0.7, 0.3, 0.0] if outskirts else [0.6, 0.22, 0.18])
            bx0, bx1 = ex[i] + WALK_EDGE + 1, ex[i + 1] - WALK_EDGE - 1
            by0, by1 = ey[j] + WALK_EDGE + 1, ey[j + 1] - WALK_EDGE - 1
            _fill_block(b, ground, max(bx0, 1.0), min(bx1, SIZE - 1), max(by0, 1.0), min(by1, SIZE - 1), kind)
            if kind == "parking":
                _park_lot(b, parked, bx0, bx1, by0, by1)

    # Sidewalk furniture and parking lanes along every straight road piece, away from junctions.
    _street_side(b, rng, parked, xs, ys, rc)
    boxes, cyl, sph = b.result()
    return Town(xs, ys, rc, ground, dist, boxes, cyl, sph, parked)


VEHICLE_SIZES = {  # nuScenes-like (w, l, h) ranges: (low, high)
    "vehicle.car": ((1.8, 4.2, 1.5), (2.0, 4.9, 1.8)),
    "vehicle.truck": ((2.3, 6.0, 2.6), (2.6, 8.0, 3.5)),
    "vehicle.bus.rigid": ((2.8, 10.5, 3.2), (3.0, 12.0, 3.6)),
    "vehicle.trailer": ((2.4, 7.0, 3.0), (2.6, 10.0, 3.8)),
    "vehicle.construction": ((2.5, 5.0, 2.8), (2.9, 7.0, 3.4)),
    "vehicle.motorcycle": ((0.7, 2.0, 1.4), (0.9, 2.3, 1.6)),
    "vehicle.bicycle": ((0.5, 1.6, 1.2), (0.7, 1.9, 1.5)),
    "human.pedestrian.adult": ((0.55, 0.6, 1.6), (0.75, 0.85, 1.9)),
    "movable_object.barrier": ((0.4, 2.0, 0.9), (0.6, 2.6, 1.1)),
    "movable_object.trafficcone": ((0.35, 0.35, 0.6), (0.45, 0.45, 0.9)),
}


def sample_size(rng, category: str) -> np.ndarray:
    lo, hi = VEHICLE_SIZES[category]
    return rng.uniform(lo, hi)


def _park_lot(b: _Builder, parked, x0, x1, y0, y1):
    """Rows of parked cars (yaw ±90°) in a lot, a construction corner with cones and barriers."""
    rng, start = b.rng, len(parked)
    for x in np.arange(x0 + 2.5, x1 - 2.5, 3.0):
        for y in (y0 + 3.5, y0 + 9.5):
            if y + 2.5 < y1 - 1.5 and rng.random() < 0.6:
                cat = rng.choice(["vehicle.car", "vehicle.construction"], p=[0.9, 0.1])
                size = sample_size(rng, cat)
                size[0] = min(size[0], 2.6)
                size[1] = min(size[1], 5.0)
                parked.append(ParkedObject(cat, np.array([x, y]), np.pi / 2, size))
    if y1 - y0 > 26:
        for x in np.arange(x0 + 3, min(x1 - 3, x0 + 15), 2.0):
            parked.append(ParkedObject("movable_object.trafficcone", np.array([x, y1 - 5.0]), 0.0,
                                       sample_size(rng, "movable_object.trafficcone")))
        parked.append(ParkedObject("movable_object.barrier", np.array([x0 + 8, y1 - 8.0]), 0.0,
                                   sample_size(rng, "movable_object.barrier")))
    # Corner blocks are cut by the ring road's curves: keep only objects clear of the sidewalk.
    keep = [o for o in parked[start:]
            if b.clear(box_corners_xy(o.xy, o.size[[1, 0]] / 2, o.yaw), 0.3)]
    del parked[start:]
    parked.extend(keep)


def _street_side(b: _Builder, rng, parked, xs, ys, rc):
    lanes = []  # (start xy, unit dir) of each straight road piece, both axes
    for x in xs:
        trim = rc if x in (xs[0], xs[-1]) else 0.0
        lanes += [(np.array([x, ys[0] + trim]), np.array([0.0, 1.0]), ys[-1] - ys[0] - 2 * trim, ys, trim)]
    for y in ys:
        trim = rc if y in (ys[0], ys[-1]) else 0.0
        lanes += [(np.array([xs[0] + trim, y]), np.array([1.0, 0.0]), xs[-1] - xs[0] - 2 * trim, xs, trim)]
    for start, d, length, cross, trim in lanes:
        base = start @ d - trim
        junctions = cross - base  # positions of the crossing roads along this piece (and its ends)
        right = np.array([d[1], -d[0]])
        for side in (1.0, -1.0):
            n = right * side
            for s in np.arange(8.0, length - 8.0, 1.0):
                if np.min(np.abs(junctions - (s + trim))) < WALK_EDGE + 5:
                    continue
                p = start + d * s
                k = int(s)
                if k % 31 == 0 and rng.random() < 0.8:
                    b.pole(*(p + n * (ROAD_HALF + 0.4)))
                if k % 17 == 5 and rng.random() < 0.7:
                    b.tree(*(p + n * (WALK_EDGE - 1.0)), in_block=False)
                if k % 7 == 3:  # a 7 m parking-lane slot
                    u = rng.random()
                    yaw = float(np.arctan2(d[1] * side, d[0] * side))  # parked along its lane's travel direction
                    c = p + n * (ROAD_HALF - PARK_W / 2)
                    if u < 0.30:
                        cat = rng.choice(["vehicle.car", "vehicle.truck", "vehicle.trailer", "vehicle.construction"],
                                         p=[0.82, 0.08, 0.05, 0.05])
                        size = sample_size(rng, cat)
                        size[0], size[1] = min(size[0], 2.4), min(size[1], 6.5)
                        parked.append(ParkedObject(cat, c, yaw, size))
                    elif u < 0.36:
                        for off in (-2.0, 0.0, 2.0):
                            parked.append(ParkedObject("movable_object.trafficcone", c + d * off, 0.0,
                                                       sample_size(rng, "movable_object.trafficcone")))
                    elif u < 0.40:
                        parked.append(ParkedObject("movable_object.barrier", c, yaw,
                                                   sample_size(rng, "movable_object.barrier")))
