"""Entry point of the synthetic world: one seeded driving scene → ``SimScene``.

Timeline: keyframes every 0.5 s (2 Hz); ``sweeps_per_keyframe`` = S spins per keyframe interval, the
keyframe being the first of them, so a scene of K keyframes has (K − 1)·S + 1 spins, 0.5/S s apart.

Terrain (``terrain="flat"`` by default, or ``"hills"``, see :mod:`.terrain`): on hills the town is draped on
the height field, every agent stands on it (upright box, bottom at the ground under its centre), the ego
rides it with its true 3-D pose (z, pitch, roll: ``SimSweep.ego2global``) and the LiDAR and the truth see
that true geometry; the nuScenes writer then drops z, pitch and roll from the ego poses it writes, as
nuScenes' 2-D localisation does. The flat world is simulated exactly as before (same bytes).
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from occ_mfd.data.synthetic.agents import DT, Track, drive, lane_route, nearest_node, walk_route, _neighbours
from occ_mfd.data.synthetic.geometry import Boxes, concat_boxes, inside_boxes, make_boxes
from occ_mfd.data.synthetic.lidar import EGO_LABEL, LidarModel, Scene, cast
from occ_mfd.data.synthetic.scene import SimAgent, SimAgentState, SimLidarCalib, SimScene, SimSweep
from occ_mfd.data.synthetic.terrain import FLAT, drape, make_terrain
from occ_mfd.data.synthetic.town import Town, build_town, sample_size
from occ_mfd.data.synthetic.truth import occupancy
from occ_mfd.ego import NUSCENES_EGO
from occ_mfd.grid import KEYFRAME_DT_S, LIDARSEG_CLASSES, OCC3D_GRID, GridSpec

KEYFRAME_US = round(KEYFRAME_DT_S * 1e6)  # 500,000 µs
#: Annotated boxes are the physical ones grown by 0.1 m per side (and 0.1 m on top): returns lie on the
#: surfaces with 2 cm range noise, and boxes must contain their points (as nuScenes' loose boxes do).
ANNOTATION_SLACK = np.array([0.2, 0.2, 0.1])
#: LIDAR_TOP → ego, rotation copied from real nuScenes (scene-0061's calibration: yaw ≈ −90°).
_R_REAL = np.array([[0.00203327, 0.99970406, 0.02424172], [-0.99998051, 0.00217566, -0.00584864],
                    [-0.00589965, -0.02422936, 0.99968904]])


def lidar_calibration() -> np.ndarray:
    """(4, 4) sensor2ego: nuScenes LIDAR_TOP rotation (re-orthonormalised) at (0.943713, 0, 1.84023) m."""
    u, _, vt = np.linalg.svd(_R_REAL)
    m = np.eye(4)
    m[:3, :3] = u @ vt
    m[:3, 3] = (0.943713, 0.0, 1.84023)
    return m


def pose_matrix(xy, yaw, z=0.0) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    m = np.eye(4)
    m[:2, :2] = [[c, -s], [s, c]]
    m[:3, 3] = (xy[0], xy[1], z)
    return m


class _Occupancy:
    """Conservative space-time footprints (chains of circles) of accepted tracks, for rejection."""

    def __init__(self):
        self.circles: list[np.ndarray] = []   # each (T, n, 2)
        self.radii: list[np.ndarray] = []

    @staticmethod
    def footprint(xy, yaw, length, width, centre_ahead=0.0):
        n = max(int(np.ceil(length / width)), 1)
        pitch = length / n
        along = (np.arange(n) + 0.5) * pitch - length / 2 + centre_ahead
        h = np.stack([np.cos(yaw), np.sin(yaw)], -1)                       # (T, 2)
        c = xy[:, None, :] + along[None, :, None] * h[:, None, :]            # (T, n, 2)
        return c, np.full(n, np.hypot(width / 2, pitch / 2) + 0.3)

    def free(self, c, r) -> bool:
        if not self.circles:
            return True
        allc, allr = np.concatenate(self.circles, 1), np.concatenate(self.radii)
        d = np.linalg.norm(c[:, :, None, :] - allc[:, None, :, :], axis=-1)  # (T, n, M)
        return bool(np.all(d > r[None, :, None] + allr[None, None, :]))

    def add(self, c, r):
        self.circles.append(c)
        self.radii.append(r)


_MOVING = {  # category: (probability, cruise speed range m/s)
    "vehicle.car": (0.62, (7, 14)), "vehicle.truck": (0.1, (6, 11)), "vehicle.bus.rigid": (0.08, (6, 10)),
    "vehicle.construction": (0.04, (3, 6)), "vehicle.motorcycle": (0.08, (8, 14)),
    "vehicle.bicycle": (0.08, (3, 6)),
}


def _populate(town: Town, ego: Track, tf: np.ndarray, rng: np.random.Generator, duration: float):
    """Accept parked objects, lane vehicles and pedestrians that never overlap each other or the ego."""
    occ = _Occupancy()
    exy, eyaw, _ = ego.pose(tf)
    # The ego's footprint: nuScenes' Zoe, its body centred ``center_ahead`` ahead of the ego origin.
    occ.add(*occ.footprint(exy, eyaw, NUSCENES_EGO.length, NUSCENES_EGO.width, NUSCENES_EGO.center_ahead))
    ego_pts = exy[:: max(len(tf) // 40, 1)]
    out: list[tuple[str, np.ndarray, Track | None, tuple]] = []  # (category, size, track, static pose)

    def near_ego(xy, r):
        return np.min(np.linalg.norm(ego_pts[:, None, :] - np.atleast_2d(xy)[None], axis=-1)) < r

    for o in town.parked:
        if not near_ego(o.xy, 90.0):
            continue
        c, r = occ.footprint(np.repeat(o.xy[None], len(tf), 0), np.full(len(tf), o.yaw), o.size[1], o.size[0])
        if occ.free(c, r):
            occ.add(c, r)
            out.append((o.category, o.size, None, (o.xy, o.yaw)))
    cats = list(_MOVING)
    probs = np.array([_MOVING[k][0] for k in cats])
    for _ in range(60):
        if sum(1 for o in out if o[2] is not None) >= 18:
            break
        node = nearest_node(town, ego_pts[rng.integers(len(ego_pts))] + rng.uniform(-120, 120, 2))
        nb = _neighbours(town, node)
        cat = cats[rng.choice(len(cats), p=probs / probs.sum())]
        size = sample_size(rng, cat)
        v = rng.uniform(*_MOVING[cat][1])
        path = lane_route(town, rng, node, nb[rng.integers(len(nb))], v * duration + 80)
        s0 = rng.uniform(5, 40)
        tr = drive(path, tf, rng, v_cruise=v, v0=rng.uniform(0, v), s0=s0, p_stop=0.3)
        xy, yaw, _ = tr.pose(tf)
        c, r = occ.footprint(xy, yaw, size[1], size[0])
        if near_ego(xy, 80.0) and occ.free(c, r):
            occ.add(c, r)
            out.append((cat, size, tr, None))
    n_ped = 0
    for _ in range(80):
        if n_ped >= 25:
            break
        path = walk_route(town, rng)
        v = 0.0 if rng.random() < 0.15 else rng.uniform(1.0, 1.6)
        s0 = rng.uniform(0, max(path.length - v * duration - 2, 0.1))
        tr = drive(path, tf, rng, v_cruise=max(v, 1e-3), v0=v, s0=s0, p_stop=0.0, a_max=0.8, b_comf=0.8)
        xy, yaw, _ = tr.pose(tf)
        size = sample_size(rng, "human.pedestrian.adult")
        c, r = occ.footprint(xy, yaw, size[1], size[0])
        if near_ego(xy, 60.0) and occ.free(c, r):
            occ.add(c, r)
            out.append(("human.pedestrian.adult", size, tr, None))
            n_ped += 1
    return out


def _boxes_at(objs, t: float, terrain=None) -> Boxes:
    parts = []
    for cat, size, tr, static in objs:
        if tr is None:
            xy, yaw = static
        else:
            p, y, _ = tr.pose(t)
            xy, yaw = p[0], y[0]
        z = size[2] / 2 if terrain is None else float(terrain.height(np.asarray(xy, float))) + size[2] / 2
        parts.append(make_boxes([xy[0], xy[1], z], size, yaw, LIDARSEG_CLASSES.index(cat)))
    return concat_boxes(parts)


def simulate_scene(name: str, *, seed: int, num_keyframes: int, sweeps_per_keyframe: int, split: str,
                   with_truth: bool = False, grid: GridSpec = OCC3D_GRID,
                   start_timestamp: int = 1_600_000_000_000_000, progress: bool = False,
                   terrain: str = FLAT) -> SimScene:
    """Simulate one scene of its own seeded town (``terrain``: "flat" or "hills", see the module docstring).

    ``map_png`` is the town's ground raster: (4000, 4000) uint8 lidarseg ids (24 driveable, 25 flat.other,
    26 sidewalk, 27 terrain) at 10 px/m covering global x, y ∈ [0, 400] m, with the global origin at the
    image's bottom-left corner (row 0 is y = 400 m), as the devkit's ``MapMask`` reads nuScenes maps.
    """
    if num_keyframes < 1 or sweeps_per_keyframe < 1:
        raise ValueError(f"simulate_scene({name!r}): need num_keyframes ≥ 1 and sweeps_per_keyframe ≥ 1, "
                         f"got {num_keyframes} and {sweeps_per_keyframe}")
    rng = np.random.default_rng(seed)
    town = build_town(rng)
    ground = make_terrain(terrain, seed)
    hilly = not ground.is_flat
    if hilly:
        town.boxes, town.cylinders, town.spheres = drape(town.boxes, town.cylinders, town.spheres, ground)
    S = sweeps_per_keyframe
    n_sweeps = (num_keyframes - 1) * S + 1
    t_sw = np.arange(n_sweeps) * (0.5 / S)
    duration = float(t_sw[-1])
    tf = np.arange(int(np.ceil(duration / DT)) + 2) * DT
    # The ego starts on an inner road heading to a neighbouring junction.
    start = (int(rng.integers(1, len(town.xs) - 1)), int(rng.integers(0, len(town.ys))))
    nb = _neighbours(town, start)
    v_ego = rng.uniform(8, 14)
    ego_path = lane_route(town, rng, start, nb[rng.integers(len(nb))], 15 * duration + 60)
    ego = drive(ego_path, tf, rng, v_cruise=v_ego, v0=rng.uniform(0, v_ego), s0=rng.uniform(12, 30), p_stop=0.3)
    objs = _populate(town, ego, tf, rng, duration)

    model = LidarModel()
    dirs = model.directions()
    s2e = lidar_calibration()
    occ_center, occ_wlh = NUSCENES_EGO.occluder_arrays()   # the car as the LiDAR sees it (ego frame)
    ego_body = lambda e2g: make_boxes(occ_center @ e2g[:3, :3].T + e2g[:3, 3], occ_wlh,
                                      np.arctan2(e2g[1, 0], e2g[0, 0]), EGO_LABEL)
    ego_local = make_boxes(occ_center, occ_wlh, 0.0, EGO_LABEL)          # hills: the body in the tilted ego frame
    statics = (town.boxes, town.cylinders, town.spheres)
    agents = [SimAgent(cat, np.asarray(size, float) + ANNOTATION_SLACK) for cat, size, _, _ in objs]
    sweeps, truth = [], []
    for i in tqdm(range(n_sweeps), desc=f"simulate {name}", disable=not progress):
        t = t_sw[i]
        exy, eyaw, _ = ego.pose(t)
        if hilly:
            e2g = ground.pose(exy[0], eyaw[0])
            dyn = _boxes_at(objs, t, ground)
            scene = Scene(concat_boxes([town.boxes, dyn]), town.cylinders, town.spheres, town.ground_class,
                          terrain=ground, local_boxes=ego_local, sensor2local=s2e)
        else:
            e2g = pose_matrix(exy[0], eyaw[0])
            dyn = _boxes_at(objs, t)
            scene = Scene(concat_boxes([town.boxes, dyn, ego_body(e2g)]), town.cylinders, town.spheres,
                          town.ground_class)
        pts, lab = cast(model, e2g @ s2e, scene, rng, dirs)
        key = i % S == 0
        sweeps.append(SimSweep(start_timestamp + int(round(t * 1e6)), e2g, pts, lab, key))
        if not key:
            continue
        k = i // S
        pg = pts[:, :3].astype(np.float64) @ (e2g @ s2e)[:3, :3].T + (e2g @ s2e)[:3, 3]
        annotated = Boxes(dyn.center + [0, 0, ANNOTATION_SLACK[2] / 2], dyn.half + ANNOTATION_SLACK[[1, 0, 2]] / 2,
                          dyn.yaw, dyn.label)
        for a, (_cat, size, tr, static) in enumerate(objs):
            if tr is None:
                xy, yaw, vel = static[0], static[1], np.zeros(2)
            else:
                p, y, v = tr.pose(t)
                xy, yaw, vel = p[0], float(y[0]), v[0]
            near = np.flatnonzero(np.abs(pg[:, 0] - xy[0]) + np.abs(pg[:, 1] - xy[1]) < size[1] + size[0] + 1)
            n_in = int(inside_boxes(pg[near], annotated, a).sum()) if len(near) else 0
            agents[a].states[k] = SimAgentState(annotated.center[a].copy(), float(yaw),
                                                np.asarray(vel, float), n_in, bool(np.hypot(*vel) > 0.1))
        if with_truth:
            truth.append(occupancy(grid, e2g, town.ground_class, statics, dyn, ground if hilly else None))
    desc = (f"synthetic town {seed}: {len(town.xs)}x{len(town.ys)} road grid with a curved ring road, "
            f"{sum(o[2] is not None for o in objs)} moving agents, {sum(o[2] is None for o in objs)} parked")
    if hilly:
        desc += ", hilly terrain"
    return SimScene(name=name, description=desc, location=f"synth-town-{seed}", calib=SimLidarCalib(s2e),
                    sweeps=sweeps, agents=agents, split=split, map_png=town.ground,
                    truth=truth if with_truth else None, terrain=ground.describe() if hilly else None)
