"""Write simulated scenes to disk in the nuScenes on-disk layout, so ``nuscenes-devkit`` loads them.

Layout written under ``out`` (exactly as nuScenes + nuScenes-lidarseg lay it out)::

    <version>/{attribute,calibrated_sensor,category,ego_pose,instance,log,map,sample,
               sample_annotation,sample_data,scene,sensor,visibility,lidarseg}.json
    <version>/splits.json                      {"train": [scene names], "val": [...]}  (ours, not nuScenes')
    samples/LIDAR_TOP/<logfile>__LIDAR_TOP__<timestamp>.pcd.bin   keyframes, float32 × 5
    sweeps/LIDAR_TOP/<logfile>__LIDAR_TOP__<timestamp>.pcd.bin    the other spins
    lidarseg/<version>/<lidar sample_data token>_lidarseg.bin     keyframes, uint8 lidarseg ids
    maps/<map token>.png                                          one semantic raster per scene/log

Only the LIDAR_TOP sensor exists (no cameras, no radars): ``sensor.json`` holds one record and
``num_radar_pts`` is 0. The category table is the 32-class nuScenes-lidarseg table with ``index``
(the devkit requires every category to have a lidarseg colour once ``lidarseg.json`` exists), so
annotation categories must be among ``LIDARSEG_CLASSES``. There are no cameras, so ``visibility``
(camera visibility in nuScenes) is derived from the annotation's LiDAR point count instead.

Tokens are md5 hex digests (32 hex characters, like nuScenes') of a stable key (``salt``, table,
scene name, index), so the same scenes and salt give a byte-identical world.

Poses: nuScenes localises in 2-D (every ``ego_pose`` has z = 0 and a yaw-only rotation) although the car
climbs and tilts. The simulator hands over true 3-D poses; ``ego_pose`` rows get :func:`planar_pose` of
them (x, y and the heading's yaw kept; z, pitch and roll dropped). The points stay in the sensor frame
as the true geometry produced them. Each keyframe's annotations are re-expressed so they keep their place
*relative to that keyframe's ego* (global_written = planar(T_k) · T_k⁻¹ · global_true, yaw-only boxes):
a box then contains its object's points when they are mapped through the written pose, as the pipeline
and the devkit map them. On the flat world both are the identity, bit for bit.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from occ_mfd.data.synthetic.nuscenes_quat import matrix_to_quat_wxyz, yaw_to_quat_wxyz
from occ_mfd.data.synthetic.scene import SimAgent, SimScene
from occ_mfd.grid import LIDARSEG_CLASSES

CHANNEL = "LIDAR_TOP"
TABLES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample",
          "sample_annotation", "sample_data", "scene", "sensor", "visibility")

#: The nuScenes attribute table (names as in v1.0).
ATTRIBUTES = {
    "vehicle.moving": "Vehicle is moving.",
    "vehicle.stopped": "Vehicle, with a driver/rider in/on it, is currently stationary but has an intent to move.",
    "vehicle.parked": "Vehicle is stationary (usually for longer duration) with no immediate intent to move.",
    "cycle.with_rider": "There is a rider on the bicycle or motorcycle.",
    "cycle.without_rider": "There is NO rider on the bicycle or motorcycle.",
    "pedestrian.sitting_lying_down": "The human is sitting or lying down.",
    "pedestrian.standing": "The human is standing.",
    "pedestrian.moving": "The human is moving.",
}
#: The nuScenes visibility table: token → (level, description). Lower bounds on LiDAR points stand in
#: for the camera visibility fraction (our world has no cameras).
VISIBILITY = {
    "1": ("v0-40", "visibility of whole object is between 0 and 40%"),
    "2": ("v40-60", "visibility of whole object is between 40 and 60%"),
    "3": ("v60-80", "visibility of whole object is between 60 and 80%"),
    "4": ("v80-100", "visibility of whole object is between 80 and 100%"),
}
_VIS_MIN_PTS = {"4": 30, "3": 10, "2": 3, "1": 0}


def make_token(salt: str, *parts: object) -> str:
    """Deterministic 32-hex token of a stable key (nuScenes tokens are 32 hex characters too)."""
    key = "\x1f".join([salt, *map(str, parts)])
    return hashlib.md5(key.encode("utf-8")).hexdigest()


def visibility_token(num_lidar_pts: int) -> str:
    """Visibility token '1'..'4' from the box's LiDAR point count (see module docstring)."""
    return next(tok for tok in ("4", "3", "2", "1") if num_lidar_pts >= _VIS_MIN_PTS[tok])


def attribute_names(agent: SimAgent, moving: bool) -> list[str]:
    """nuScenes attributes for one annotation: vehicles moving/stopped/parked, cycles with/without rider,
    pedestrians moving/standing, none for static objects (cones, barriers, …)."""
    ever_moves = any(s.moving for s in agent.states.values())
    cat = agent.category
    if cat in ("vehicle.bicycle", "vehicle.motorcycle"):
        return ["cycle.with_rider" if ever_moves else "cycle.without_rider"]
    if cat.startswith("vehicle."):
        return ["vehicle.moving" if moving else "vehicle.stopped" if ever_moves else "vehicle.parked"]
    if cat.startswith("human.pedestrian."):
        return ["pedestrian.moving" if moving else "pedestrian.standing"]
    return []


def is_planar(pose: np.ndarray) -> bool:
    """Whether a (4, 4) pose already is a nuScenes one: z = 0 and a rotation about +z only (exactly)."""
    m = np.asarray(pose, dtype=np.float64)
    return bool(m[2, 3] == 0.0 and m[2, 2] == 1.0 and not m[2, :2].any() and not m[:2, 2].any())


def planar_pose(pose: np.ndarray) -> np.ndarray:
    """What nuScenes' 2-D localisation records of a true pose: same x, y, yaw of the heading (the forward
    axis's horizontal direction), z = 0, no pitch or roll. Planar poses are returned unchanged (same object)."""
    m = np.asarray(pose, dtype=np.float64)
    if is_planar(m):
        return m
    yaw = np.arctan2(m[1, 0], m[0, 0])
    out = np.eye(4)
    out[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
    out[:2, 3] = m[:2, 3]
    return out


def _vec(a) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=np.float64).ravel()]


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class _Tables:
    """Accumulates the 13 nuScenes tables (+ lidarseg) while scenes stream through."""

    def __init__(self, out: Path, version: str, salt: str):
        self.out, self.version, self.salt = out, version, salt
        self.rows: dict[str, list[dict]] = {t: [] for t in TABLES}
        self.rows["lidarseg"] = []
        self.splits: dict[str, list[str]] = {"train": [], "val": []}
        self.num_sweeps = 0
        self.sensor_token = make_token(salt, "sensor", CHANNEL)
        self.cat_token = {n: make_token(salt, "category", n) for n in LIDARSEG_CLASSES}
        self.attr_token = {n: make_token(salt, "attribute", n) for n in ATTRIBUTES}
        self.rows["sensor"].append({"token": self.sensor_token, "channel": CHANNEL, "modality": "lidar"})
        self.rows["category"] = [{"token": self.cat_token[n], "name": n, "description": f"lidarseg class {n}",
                                  "index": i} for i, n in enumerate(LIDARSEG_CLASSES)]
        self.rows["attribute"] = [{"token": self.attr_token[n], "name": n, "description": d}
                                  for n, d in ATTRIBUTES.items()]
        self.rows["visibility"] = [{"token": t, "level": lv, "description": d} for t, (lv, d) in VISIBILITY.items()]

    def tok(self, *parts: object) -> str:
        return make_token(self.salt, *parts)

    # ------------------------------------------------------------------------------------ one scene
    def add_scene(self, scene: SimScene) -> list[str]:
        """Write the scene's files and rows; returns its sample tokens in time order."""
        if scene.split not in self.splits:
            raise ValueError(f"scene {scene.name}: split must be 'train' or 'val', got {scene.split!r}")
        if any(scene.name in names for names in self.splits.values()):
            raise ValueError(f"scene {scene.name}: duplicate scene name")
        sweeps = sorted(scene.sweeps, key=lambda s: s.timestamp)
        keys = [i for i, s in enumerate(sweeps) if s.is_key]
        if not keys:
            raise ValueError(f"scene {scene.name}: no keyframe sweeps")
        n = scene.name
        log_tok, map_tok, cs_tok, scene_tok = (self.tok(t, n) for t in ("log", "map", "calibrated_sensor", "scene"))
        logfile = f"synth-{n}"
        self.rows["log"].append({"token": log_tok, "logfile": logfile, "vehicle": "synth-ego",
                                 "date_captured": "2020-09-13", "location": scene.location})
        self._write_map(scene, map_tok, log_tok)
        calib = np.asarray(scene.calib.sensor2ego, dtype=np.float64)
        self.rows["calibrated_sensor"].append({
            "token": cs_tok, "sensor_token": self.sensor_token, "translation": _vec(calib[:3, 3]),
            "rotation": matrix_to_quat_wxyz(calib[:3, :3]), "camera_intrinsic": []})

        sample_toks = [self.tok("sample", n, k) for k in range(len(keys))]
        sd_toks = [self.tok("sample_data", n, i) for i in range(len(sweeps))]
        # A sweep belongs to the next keyframe's sample (the last one after the final keyframe).
        owner, k = [], 0
        for i in range(len(sweeps)):
            while k < len(keys) - 1 and keys[k] < i:
                k += 1
            owner.append(k)
        for k, i in enumerate(keys):
            self.rows["sample"].append({
                "token": sample_toks[k], "timestamp": int(sweeps[i].timestamp),
                "prev": sample_toks[k - 1] if k > 0 else "", "next": sample_toks[k + 1] if k + 1 < len(keys) else "",
                "scene_token": scene_tok})
        for i, sw in enumerate(sweeps):
            self._add_sweep(scene, sw, i, sd_toks, sample_toks[owner[i]], cs_tok, logfile)
        self._add_agents(scene, sample_toks, [sweeps[i].ego2global for i in keys])
        self.rows["scene"].append({"token": scene_tok, "log_token": log_tok, "nbr_samples": len(keys),
                                   "first_sample_token": sample_toks[0], "last_sample_token": sample_toks[-1],
                                   "name": n, "description": scene.description})
        self.splits[scene.split].append(n)
        return sample_toks

    def _write_map(self, scene: SimScene, map_tok: str, log_tok: str) -> None:
        raster = scene.map_png if scene.map_png is not None else np.zeros((8, 8), np.uint8)
        raster = np.asarray(raster)
        if raster.ndim != 2 or raster.dtype != np.uint8:
            raise ValueError(f"scene {scene.name}: map_png must be (H, W) uint8, got {raster.shape} {raster.dtype}")
        rel = f"maps/{map_tok}.png"
        (self.out / "maps").mkdir(parents=True, exist_ok=True)
        Image.fromarray(raster, mode="L").save(self.out / rel, format="PNG")
        self.rows["map"].append({"token": map_tok, "log_tokens": [log_tok], "category": "semantic_prior",
                                 "filename": rel})

    def _add_sweep(self, scene, sw, i, sd_toks, sample_tok, cs_tok, logfile) -> None:
        pts = np.asarray(sw.points)
        if pts.ndim != 2 or pts.shape[1] != 5:
            raise ValueError(f"scene {scene.name} sweep {i}: points must be (N, 5), got {pts.shape}")
        folder = "samples" if sw.is_key else "sweeps"
        rel = f"{folder}/{CHANNEL}/{logfile}__{CHANNEL}__{int(sw.timestamp)}.pcd.bin"
        _write_bytes(self.out / rel, pts.astype("<f4").tobytes())
        tok = sd_toks[i]
        pose = planar_pose(sw.ego2global)
        # nuScenes keeps one ego_pose per sample_data, sharing its token.
        self.rows["ego_pose"].append({"token": tok, "timestamp": int(sw.timestamp),
                                      "rotation": matrix_to_quat_wxyz(pose[:3, :3]), "translation": _vec(pose[:3, 3])})
        self.rows["sample_data"].append({
            "token": tok, "sample_token": sample_tok, "ego_pose_token": tok, "calibrated_sensor_token": cs_tok,
            "timestamp": int(sw.timestamp), "fileformat": "pcd", "is_key_frame": bool(sw.is_key),
            "height": 0, "width": 0, "filename": rel,
            "prev": sd_toks[i - 1] if i > 0 else "", "next": sd_toks[i + 1] if i + 1 < len(sd_toks) else ""})
        self.num_sweeps += 1
        if sw.is_key:
            labels = np.asarray(sw.labels)
            if labels.shape != (len(pts),):
                raise ValueError(f"scene {scene.name} keyframe sweep {i}: {labels.shape} labels for {len(pts)} points")
            if labels.size and int(labels.max()) >= len(LIDARSEG_CLASSES):
                raise ValueError(f"scene {scene.name} sweep {i}: lidarseg label {int(labels.max())} > 31")
            seg = f"lidarseg/{self.version}/{tok}_lidarseg.bin"
            _write_bytes(self.out / seg, labels.astype(np.uint8).tobytes())
            # The community reads nusc.get('lidarseg', sample_data_token): the token equals the sample_data's.
            self.rows["lidarseg"].append({"token": tok, "sample_data_token": tok, "filename": seg})

    def _add_agents(self, scene: SimScene, sample_toks: list[str], key_poses: list | None = None) -> None:
        n = scene.name
        # true global → written global per keyframe (identity where the pose is planar already)
        to_written = [None if p is None or is_planar(p) else planar_pose(p) @ np.linalg.inv(p)
                      for p in (key_poses or [None] * len(sample_toks))]
        for a, agent in enumerate(scene.agents):
            if agent.category not in self.cat_token:
                raise ValueError(f"scene {n} agent {a}: category {agent.category!r} is not a nuScenes-lidarseg class")
            ks = sorted(agent.states)
            if not ks:
                continue
            if ks[0] < 0 or ks[-1] >= len(sample_toks):
                raise ValueError(f"scene {n} agent {a}: keyframe index {ks[-1]} outside 0..{len(sample_toks) - 1}")
            inst_tok = self.tok("instance", n, a)
            ann_toks = [self.tok("sample_annotation", n, a, k) for k in ks]
            for j, k in enumerate(ks):
                st = agent.states[k]
                center, yaw = st.center, float(st.yaw)
                if k < len(to_written) and to_written[k] is not None:
                    w = to_written[k]
                    center = w[:3, :3] @ np.asarray(center, float) + w[:3, 3]
                    head = w[:3, :3] @ np.array([np.cos(yaw), np.sin(yaw), 0.0])
                    yaw = float(np.arctan2(head[1], head[0]))
                self.rows["sample_annotation"].append({
                    "token": ann_toks[j], "sample_token": sample_toks[k], "instance_token": inst_tok,
                    "visibility_token": visibility_token(int(st.num_lidar_pts)),
                    "attribute_tokens": [self.attr_token[x] for x in attribute_names(agent, bool(st.moving))],
                    "translation": _vec(center), "size": _vec(agent.size),
                    "rotation": yaw_to_quat_wxyz(yaw),
                    "prev": ann_toks[j - 1] if j > 0 else "", "next": ann_toks[j + 1] if j + 1 < len(ks) else "",
                    "num_lidar_pts": int(st.num_lidar_pts), "num_radar_pts": 0})
            self.rows["instance"].append({"token": inst_tok, "category_token": self.cat_token[agent.category],
                                          "nbr_annotations": len(ks), "first_annotation_token": ann_toks[0],
                                          "last_annotation_token": ann_toks[-1]})

    # ------------------------------------------------------------------------------------ finish
    def finish(self) -> None:
        root = self.out / self.version
        root.mkdir(parents=True, exist_ok=True)
        (self.out / "lidarseg" / self.version).mkdir(parents=True, exist_ok=True)
        for name, rows in self.rows.items():
            (root / f"{name}.json").write_text(json.dumps(rows, indent=0))
        (root / "splits.json").write_text(json.dumps(self.splits, indent=1))


def write_scenes(scenes: Iterable[SimScene], out: Path, version: str, *, salt: str = "",
                 on_scene=None) -> dict:
    """Write ``scenes`` (streamed: each scene's files are written as it arrives) as a nuScenes dataroot.

    Args:
        scenes: the simulated scenes, in the order they should appear in the tables.
        out: the dataroot to write into (created; should be empty — ``world.make_world`` writes into a
            fresh temporary folder and renames it, which makes the whole world atomic).
        version: the nuScenes version folder name, e.g. ``v1.0-synth``.
        salt: mixed into every token (``world`` passes the seed), so different worlds get different tokens.
        on_scene: optional callback ``f(scene, sample_tokens)`` after each scene (e.g. the truth writer).
    Returns:
        {"scenes": int, "samples": int, "sweeps": int, "splits": {"train": [...], "val": [...]}}.
    """
    if not version or "/" in version or "\\" in version:
        raise ValueError(f"write_scenes: bad version folder name {version!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = _Tables(out, version, salt)
    for scene in scenes:
        sample_toks = tables.add_scene(scene)
        if on_scene is not None:
            on_scene(scene, sample_toks)
    if not tables.rows["scene"]:
        raise ValueError("write_scenes: no scenes given")
    tables.finish()
    return {"scenes": len(tables.rows["scene"]), "samples": len(tables.rows["sample"]),
            "sweeps": tables.num_sweeps, "splits": tables.splits}
