"""The vertical pose nuScenes does not record (z, pitch, roll), recovered so accumulated labels stay sharp on hills.

**The problem.** nuScenes localises in 2-D: every ``ego_pose`` has z = 0 and a yaw-only rotation, although
logs such as Singapore One-North climb and descend several metres within a scene. A sweep's points are
exact in its own ego frame (the calibration is exact), but mapped to the global frame through the 2-D pose
P_s they keep the car's tilt and lose its height. On a constant grade nothing goes wrong (every frame rides
the same slope); where the grade *changes* — a crest, a valley — the same road seen from two places lands at
different heights and angles, and accumulating a whole scene smears it over several layers (3 m on a real
One-North sequence). Objects and free space near the road inherit the smear.

**The method: ground registration** (:func:`level_scene`). The true pose of sweep s is P_s·C_s, C_s a rigid
motion of the ego frame with only z, pitch and roll (x, y and yaw are what nuScenes does record). C_s is
estimated sweep by sweep, in time order, by registering the sweep's ground to a ground map built from the
sweeps before it:

1. The map: cells of ``cell`` m in the (written) global xy, each holding running sums of its points' x, y
   and z; a query answers its cell's mean height continued to the query's own xy along the slope of the
   plane through the 3 × 3 neighbouring cell means (so a cell on an 8 % slope is not biased by where its
   points lie, and the range noise along descending rays fakes no slope). Sweep 0 seeds it (C_0 = identity
   fixes the gauge, see 4.).
2. A sweep's candidates: points with a lidarseg ground class (driveable, other flat, sidewalk, terrain) where
   the sweep has lidarseg; otherwise the points 3–40 m away horizontally, outside the ego body, that lie within
   10 cm of the lowest point of their ``cell`` column (the ground, and the feet of walls and poles). They go
   through P_s·C (C extrapolated linearly in time from the two previous sweeps), and robust least squares
   solves the linearised update z' = z + δz + a·x + b·y (x, y, z in the corrected ego frame; a = −δpitch,
   b = δroll) on the points within a gate of the map's plane: first points within 20 m and a 1 m gate, then
   all, the gate shrinking to 3 robust sigmas (≥ 5 cm); 8 iterations at most. Fewer than ``min_points``
   matches → the extrapolated C is kept and the sweep counted in ``failed`` (the bound on what cannot be
   recovered: such a sweep is only as wrong as the extrapolation).
3. The map grows with each registered sweep's ground: its lidarseg ground points, or — where the scene has
   no lidarseg at all — each keyframe sweep's lowest static points per cell outside the annotated boxes.
4. Accumulation then uses the corrected poses: every sweep's points and sensor origin, its boxes (moved by
   M_s = P_s·C_s·P_s⁻¹, which keeps each box fixed in its sweep's ego frame, as annotated) and the keyframes'
   cameras. Each keyframe's labels are made in its corrected ego frame, which is its true ego frame up to
   the gauge (one rigid motion of the whole scene, which cancels: labels are relative to the ego). The
   written 2-D poses stay in index.json (they are what the dataset and the forecasters use).

``mode``: "auto" (prepare's default) applies the corrections only where they matter: when the written poses
would misplace one sweep's points relative to another's (sweeps within ``level_pair_m`` of each other, points
up to 40 m from the ego) by more than ``level_smear`` vertically (``VerticalFit.smear``). The measure is
blind to the gauge: a whole scene estimated as slightly tilted (a tilt of 1e-4 rad makes the raw |dz| grow to
centimetres over a long flat scene) moves nothing relative to the ego. On flat ground the labels stay bit for bit
those of the written poses; "on" always applies the corrections; "off" never estimates anything (the
behaviour before this module).

Measured on the hilly synthetic world against its exact truth (``tools/make_synthetic.py --terrain hills``,
see the README): the recovered heights and tilts match the true poses to centimetres and hundredths of a
degree, and the ground columns spanning ≤ 2 layers go back to the flat world's share.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from occ_mfd.data.nuscenes import BoxRecord, CameraRecord, KeyframeRecord, SceneRecord, read_lidarseg, read_pcd_bin
from occ_mfd.data.occupancy.points import EGO_BOX, ego_mask, points_in_box, rigid_inverse, transform
from occ_mfd.grid import lidarseg_to_occ3d

VERTICAL_MODES = ("off", "auto", "on")
GROUND_IDS = (11, 12, 13, 14)


@dataclass
class VerticalConfig:
    """See the module docstring. Distances in metres, angles in radians."""

    mode: str = "auto"
    cell: float = 0.5
    r_min: float = 3.0
    r_max: float = 40.0
    r_coarse: float = 20.0
    gate0: float = 1.0
    gate_min: float = 0.05
    iters: int = 8
    min_points: int = 200
    max_points: int = 30000
    level_smear: float = 0.1
    level_pair_m: float = 60.0
    ego_box: tuple = EGO_BOX

    def __post_init__(self):
        if self.mode not in VERTICAL_MODES:
            raise ValueError(f"vertical mode must be one of {VERTICAL_MODES}, got {self.mode!r}")


@dataclass
class VerticalFit:
    """Per sweep (time order, ``SceneRecord.all_sweeps``): token, the correction C (4, 4) in its ego frame and
    its parameters (dz m, pitch rad, roll rad); whether the corrections were applied; sweeps that kept the
    extrapolated correction (``failed``); inlier counts."""

    tokens: list[str] = field(default_factory=list)
    corrections: list[np.ndarray] = field(default_factory=list)
    params: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    applied: bool = False
    failed: int = 0
    inliers: list[int] = field(default_factory=list)
    smear: float = 0.0

    @property
    def max_dz(self) -> float:
        return float(np.abs(self.params[:, 0]).max()) if len(self.params) else 0.0

    @property
    def max_tilt(self) -> float:
        return float(np.hypot(self.params[:, 1], self.params[:, 2]).max()) if len(self.params) else 0.0

    def summary(self) -> dict:
        return {"applied": self.applied, "sweeps": len(self.tokens), "failed": self.failed,
                "smear_m": round(self.smear, 3), "max_dz_m": round(self.max_dz, 3),
                "max_tilt_deg": round(float(np.degrees(self.max_tilt)), 3)}


def written_smear(written: np.ndarray, corrected: np.ndarray, pair_m: float = 60.0, reach: float = 40.0) -> float:
    """The largest vertical misplacement (m) that using the ``written`` (S, 4, 4) poses instead of the
    ``corrected`` ones makes between two sweeps within ``pair_m`` of each other, at points up to ``reach`` from
    the ego (its origin and ±reach along x and y). A common rigid motion of all corrected poses (the gauge)
    cancels."""
    probes = np.array([[0, 0, 0, 1], [reach, 0, 0, 1], [-reach, 0, 0, 1], [0, reach, 0, 1], [0, -reach, 0, 1.0]])
    xy = written[:, :2, 3]
    inv_w = np.linalg.inv(written)
    inv_c = np.linalg.inv(corrected)
    worst = 0.0
    for s in range(len(written)):
        r = np.flatnonzero(np.hypot(*(xy - xy[s]).T) <= pair_m)
        a_w = inv_w[r] @ written[s]                                           # sweep s → sweep r, as written
        a_c = inv_c[r] @ corrected[s]                                         # … as corrected
        dz = (a_c @ probes.T)[:, 2, :] - (a_w @ probes.T)[:, 2, :]
        worst = max(worst, float(np.abs(dz).max()))
    return worst


def correction_matrix(dz: float, pitch: float, roll: float) -> np.ndarray:
    """(4, 4) ego-frame correction: translation (0, 0, dz) ∘ rotation about y by ``pitch`` ∘ about x by ``roll``."""
    cp, sp, cr, sr = np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    m = np.eye(4)
    m[:3, :3] = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]]) @ np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    m[2, 3] = dz
    return m


def correction_params(m: np.ndarray) -> np.ndarray:
    """Inverse of :func:`correction_matrix` (dz, pitch, roll) for a z/pitch/roll-only matrix."""
    return np.array([m[2, 3], np.arcsin(np.clip(-m[2, 0], -1, 1)), np.arctan2(m[2, 1], m[2, 2])])


class GroundMap:
    """Running per-cell sums of the ground points over a dense xy window (see the module docstring, step 1).

    A query at xy answers the mean height of its cell, continued to xy along the slope of the plane fitted
    to the means of the 3 × 3 cells around it. The slope comes from cell means 0.5 m apart, not from the points
    inside one cell: within a cell, a ring's points spread radially by their range noise, and along a
    descending ray farther also means lower, which would fake a slope of −tan(elevation)."""

    STATS = 4  # n, Σx, Σy, Σz (x, y relative to the cell centre)

    def __init__(self, lo_xy: np.ndarray, hi_xy: np.ndarray, cell: float):
        self.cell = float(cell)
        self.lo = np.floor(np.asarray(lo_xy, float) / cell) * cell
        self.shape = tuple(int(v) for v in np.ceil((np.asarray(hi_xy, float) - self.lo) / cell) + 1)
        self.sums = np.zeros((self.STATS, self.shape[0] * self.shape[1]))

    def _cells(self, xy: np.ndarray):
        ij = np.floor((xy - self.lo) / self.cell).astype(np.int64)
        ok = (ij[:, 0] >= 1) & (ij[:, 0] < self.shape[0] - 1) & (ij[:, 1] >= 1) & (ij[:, 1] < self.shape[1] - 1)
        flat = np.where(ok, ij[:, 0] * self.shape[1] + ij[:, 1], 0)
        rel = xy - (self.lo + (ij + 0.5) * self.cell)
        return flat, ok, rel

    def add(self, p: np.ndarray) -> None:
        """Add (N, 3) global points."""
        if not len(p):
            return
        flat, ok, rel = self._cells(p[:, :2])
        flat, rel, z = flat[ok], rel[ok], p[ok, 2]
        n = self.sums.shape[1]
        for k, w in enumerate((np.ones_like(z), rel[:, 0], rel[:, 1], z)):
            self.sums[k] += np.bincount(flat, weights=w, minlength=n)

    def height(self, xy: np.ndarray, min_count: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """(N,) ground heights at global xy and (N,) whether the cell had ≥ ``min_count`` points."""
        flat, ok, rel = self._cells(xy)
        ok &= self.sums[0, flat] >= min_count
        out = np.zeros(len(xy))
        if not ok.any():
            return out, ok
        cells, inv = np.unique(flat[ok], return_inverse=True)
        W = self.shape[1]
        offs = np.array([(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)])
        nb = cells[:, None] + offs[:, 0] * W + offs[:, 1]                        # (C, 9) neighbour cells
        s = self.sums[:, nb]                                                     # (4, C, 9)
        cnt = s[0]
        has = cnt > 0
        safe = np.where(has, cnt, 1.0)
        mx = s[1] / safe + offs[:, 0] * self.cell                                # means, relative to the centre
        my = s[2] / safe + offs[:, 1] * self.cell
        mz = s[3] / safe
        w = np.where(has, np.minimum(cnt, 20.0), 0.0)
        sw, sx, sy = w.sum(1), (w * mx).sum(1), (w * my).sum(1)
        sxx, sxy, syy = (w * mx * mx).sum(1), (w * mx * my).sum(1), (w * my * my).sum(1)
        sz, sxz, syz = (w * mz).sum(1), (w * mx * mz).sum(1), (w * my * mz).sum(1)
        lam = 1e-3 * sw * self.cell ** 2                                         # keeps a lone row of cells solvable
        A = np.stack([np.stack([sw, sx, sy], -1), np.stack([sx, sxx + lam, sxy], -1),
                      np.stack([sy, sxy, syy + lam], -1)], 1)
        coef = np.linalg.solve(A, np.stack([sz, sxz, syz], -1)[..., None])[..., 0]   # (C, 3): a, gx, gy
        k = coef[inv]
        c = 4                                                                    # the centre cell in ``offs``
        cx, cy, cz = mx[inv, c], my[inv, c], mz[inv, c]
        r = rel[ok]
        out[ok] = cz + k[:, 1] * (r[:, 0] - cx) + k[:, 2] * (r[:, 1] - cy)
        return out, ok


def _ground_candidates(raw: np.ndarray, seg, s2e: np.ndarray, cfg: VerticalConfig):
    """Ego-frame points for registration: lidarseg ground where labelled, else all non-ego points within the
    horizontal range [r_min, r_max]. Returns (points (N, 3), labelled?)."""
    keep = ~ego_mask(raw, s2e, cfg.ego_box)
    p = transform(raw[keep], s2e)
    if seg is not None:
        return p[np.isin(lidarseg_to_occ3d(seg[keep]), GROUND_IDS)], True
    r = np.hypot(p[:, 0], p[:, 1])
    p = p[(r >= cfg.r_min) & (r <= cfg.r_max) & (np.abs(p[:, 2]) < 8.0)]
    return _geometric_ground(p, [], cfg.cell), False


def _geometric_ground(p_ego: np.ndarray, boxes_ego: list[tuple[np.ndarray, np.ndarray]], cell: float) -> np.ndarray:
    """Without lidarseg: the lowest points (within 10 cm) of each ``cell`` column, outside the boxes."""
    keep = np.ones(len(p_ego), bool)
    for b2e, wlh in boxes_ego:
        m, _ = points_in_box(p_ego, b2e, wlh, 0.3, 0.3)
        keep &= ~m
    p = p_ego[keep]
    if not len(p):
        return p
    ij = np.floor(p[:, :2] / cell).astype(np.int64)
    _, inv = np.unique(ij, axis=0, return_inverse=True)
    inv = inv.ravel()
    zmin = np.full(inv.max() + 1, np.inf)
    np.minimum.at(zmin, inv, p[:, 2])
    return p[p[:, 2] <= zmin[inv] + 0.1]


def _register(pts: np.ndarray, P: np.ndarray, C: np.ndarray, gmap: GroundMap, cfg: VerticalConfig):
    """Robust least squares of the ego-frame correction (module docstring, step 2) → (C or None when too few
    points matched the map, inliers)."""
    if len(pts) > cfg.max_points:
        pts = pts[np.linspace(0, len(pts) - 1, cfg.max_points).astype(np.int64)]
    rxy = np.hypot(pts[:, 0], pts[:, 1])
    gate, inl = cfg.gate0, 0
    for it in range(cfg.iters):
        use = np.ones(len(pts), bool) if it >= 2 else rxy <= cfg.r_coarse
        q = transform(pts[use], C)
        g = transform(q, P)
        ref, ok = gmap.height(g[:, :2])
        r = ref - g[:, 2]
        sel = ok & (np.abs(r) < gate)
        inl = int(sel.sum())
        if inl < cfg.min_points:
            return None, inl
        A = np.stack([np.ones(inl), q[sel, 0], q[sel, 1]], 1)
        A = np.concatenate([A, np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])])            # tiny ridge on a, b
        sol = np.linalg.lstsq(A, np.concatenate([r[sel], [0.0, 0.0]]), rcond=None)[0]
        C = correction_matrix(sol[0], -sol[1], sol[2]) @ C
        res = r[sel] - A[:-2] @ sol
        sigma = 1.4826 * float(np.median(np.abs(res - np.median(res))))
        gate = min(gate, max(3.0 * sigma, cfg.gate_min)) if it >= 1 else min(gate, 0.5)
        if it >= 3 and np.abs(sol).max() < 1e-5:
            break
    return C, inl


def estimate_vertical(scene: SceneRecord, cfg: VerticalConfig = VerticalConfig(), on_bad=None) -> VerticalFit:
    """Register every sweep of ``scene`` (time order) to the ground map; see the module docstring."""
    sweeps = scene.all_sweeps()
    fit = VerticalFit()
    if not sweeps:
        return fit
    xy = np.array([sw.ego2global[:2, 3] for _, sw in sweeps])
    gmap = GroundMap(xy.min(0) - 75.0, xy.max(0) + 75.0, cfg.cell)          # the LiDAR reaches ~70 m
    any_seg = any(sw.lidarseg_path is not None for _, sw in sweeps)
    params, times = [], []
    for i, (k, sw) in enumerate(sweeps):
        try:
            raw = read_pcd_bin(sw.path)
            seg = read_lidarseg(sw.lidarseg_path, len(raw)) if sw.lidarseg_path is not None else None
        except (OSError, ValueError) as e:
            if on_bad is None:
                raise
            on_bad(e)
            raw, seg = None, None
        if len(params) >= 2:
            dt0 = times[-1] - times[-2]
            w = (sw.timestamp - times[-1]) / dt0 if dt0 > 0 else 0.0
            pred = params[-1] + np.clip(w, 0.0, 4.0) * (params[-1] - params[-2])
        else:
            pred = params[-1] if params else np.zeros(3)
        C = correction_matrix(*pred)
        n_in = 0
        if raw is not None:
            pts, labelled = _ground_candidates(raw, seg, sw.sensor2ego, cfg)
            if i == 0:
                C = np.eye(4)
            else:
                C_fit, n_in = _register(pts, sw.ego2global, C, gmap, cfg)
                if C_fit is None:
                    fit.failed += 1
                else:
                    C = C_fit
            grow = pts if labelled else None
            if not any_seg and sw.is_key:
                boxes = [(rigid_inverse(sw.ego2global) @ b.box2global(), b.wlh) for b in scene.keyframes[k].boxes]
                ego = transform(raw[~ego_mask(raw, sw.sensor2ego, cfg.ego_box)], sw.sensor2ego)
                grow = _geometric_ground(ego, boxes, cfg.cell)
            if grow is not None and len(grow):
                gmap.add(transform(transform(grow, C), sw.ego2global))
        else:
            fit.failed += 1
        p = correction_params(C)
        params.append(p)
        times.append(sw.timestamp)
        fit.tokens.append(sw.token)
        fit.corrections.append(C)
        fit.inliers.append(n_in)
    fit.params = np.array(params)
    written = np.stack([sw.ego2global for _, sw in sweeps])
    fit.smear = written_smear(written, written @ np.stack(fit.corrections), cfg.level_pair_m)
    fit.applied = cfg.mode == "on" or (cfg.mode == "auto" and fit.smear > cfg.level_smear)
    return fit


def _move_box(b: BoxRecord, M: np.ndarray) -> BoxRecord:
    return replace(b, center=M[:3, :3] @ b.center + M[:3, 3], rotation=M[:3, :3] @ b.rotation)


def apply_vertical(scene: SceneRecord, fit: VerticalFit, boxes_of):
    """The scene with corrected sweep poses (P_s·C_s), boxes and cameras, and ``boxes_of`` wrapped to move the
    boxes it returns by their sweep's correction. Returns (scene, boxes_of) unchanged when not ``applied``."""
    if not fit.applied:
        return scene, boxes_of
    C = dict(zip(fit.tokens, fit.corrections))
    moves: dict[str, np.ndarray] = {}

    def fix(sw):
        P = sw.ego2global
        new = P @ C[sw.token]
        moves[sw.token] = new @ rigid_inverse(P)
        return replace(sw, ego2global=new)

    kfs = []
    for kf in scene.keyframes:
        lidar = fix(kf.lidar)
        after = [fix(s) for s in kf.sweeps_after]
        M = moves[kf.lidar.token]
        cams = [replace(c, ego2global=M @ c.ego2global) if isinstance(c, CameraRecord) else c for c in kf.cameras]
        kfs.append(KeyframeRecord(kf.token, kf.timestamp, lidar, after, [_move_box(b, M) for b in kf.boxes], cams))
    moved = SceneRecord(scene.name, scene.token, scene.split, kfs)

    def boxes_of_moved(sw, kf):
        return [_move_box(b, moves[sw.token]) for b in (boxes_of(sw, kf) if boxes_of is not None else [])]

    return moved, boxes_of_moved


def level_scene(scene: SceneRecord, boxes_of, cfg: VerticalConfig = VerticalConfig(), on_bad=None):
    """:func:`estimate_vertical` then :func:`apply_vertical` → (scene, boxes_of, fit); ``mode="off"`` returns
    the inputs and an empty fit without reading anything."""
    if cfg.mode == "off":
        return scene, boxes_of, VerticalFit()
    fit = estimate_vertical(scene, cfg, on_bad)
    moved, b = apply_vertical(scene, fit, boxes_of)
    return moved, b, fit
