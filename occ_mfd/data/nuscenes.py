"""nuScenes access, all through ``nuscenes-devkit``: scenes, keyframes, LiDAR sweeps, poses, boxes, splits.

Nothing here parses the JSON tables by hand; the devkit's ``NuScenes`` object does. What we return are
plain dataclasses with 4×4 float64 matrices, so the occupancy code never touches the devkit.

Splits: real versions (``v1.0-trainval``, ``v1.0-mini``, ``v1.0-test``) use the devkit's official
``nuscenes.utils.splits.create_splits_scenes`` (mini → ``mini_train``/``mini_val``, reported as
"train"/"val"); any other version (the synthetic world) reads ``<dataroot>/<version>/splits.json``
``{"train": [...], "val": [...]}``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pyquaternion import Quaternion

LIDAR = "LIDAR_TOP"
POINT_DIMS = 5  # nuScenes .pcd.bin: x, y, z, intensity, ring as float32
REAL_VERSIONS = ("v1.0-trainval", "v1.0-mini", "v1.0-test")


def pose_matrix(rotation_wxyz, translation) -> np.ndarray:
    """(4, 4) float64 homogeneous transform from a nuScenes quaternion (w, x, y, z) and translation."""
    m = np.eye(4)
    m[:3, :3] = Quaternion(rotation_wxyz).rotation_matrix
    m[:3, 3] = np.asarray(translation, dtype=np.float64)
    return m


def read_pcd_bin(path: str | os.PathLike) -> np.ndarray:
    """Read a nuScenes ``.pcd.bin`` → (N, 5) float32 (x, y, z, intensity, ring), sensor frame.

    Raises FileNotFoundError / ValueError naming the file when it is missing, its size is not a
    multiple of 20 bytes (5 float32), or it holds NaN/inf.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: LiDAR point file not found")
    size = path.stat().st_size
    if size % (4 * POINT_DIMS):
        raise ValueError(f"{path}: size {size} bytes is not a multiple of {4 * POINT_DIMS} "
                         f"({POINT_DIMS} float32 per point); truncated or not a nuScenes .pcd.bin")
    pts = np.fromfile(path, dtype=np.float32).reshape(-1, POINT_DIMS)
    bad = ~np.isfinite(pts).all(axis=1)
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} of {len(pts)} points hold NaN/inf values")
    return pts


def read_lidarseg(path: str | os.PathLike, num_points: int) -> np.ndarray:
    """Read a lidarseg ``.bin`` → (N,) uint8 class indices; checks the count against the point file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: lidarseg label file not found")
    labels = np.fromfile(path, dtype=np.uint8)
    if len(labels) != num_points:
        raise ValueError(f"{path}: {len(labels)} lidarseg labels for {num_points} points")
    if labels.size and labels.max() >= 32:
        raise ValueError(f"{path}: lidarseg label {labels.max()} outside 0..31")
    return labels


@dataclass
class BoxRecord:
    """One annotated box in the **global** frame (at a keyframe, or interpolated for a sweep).

    center: (3,), wlh: (3,) width/length/height, rotation: (3, 3); ``box2global()`` gives the (4, 4) pose.
    """

    instance_token: str
    category: str
    center: np.ndarray
    wlh: np.ndarray
    rotation: np.ndarray
    num_lidar_pts: int = -1

    def box2global(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.center
        return m


@dataclass
class SweepRecord:
    """One LIDAR_TOP spin (a keyframe's own sweep or one between keyframes).

    sensor2ego, ego2global: (4, 4) float64; path: absolute ``.pcd.bin``; lidarseg_path: absolute
    label file or None; boxes: filled by :meth:`NuScenesSource.boxes` on demand.
    """

    token: str
    timestamp: int
    path: Path
    sensor2ego: np.ndarray
    ego2global: np.ndarray
    is_key: bool
    lidarseg_path: Path | None = None


@dataclass
class CameraRecord:
    """One camera at a keyframe: cam2ego (4, 4), ego2global (4, 4) of the image, intrinsic (3, 3), size."""

    channel: str
    cam2ego: np.ndarray
    ego2global: np.ndarray
    intrinsic: np.ndarray
    width: int
    height: int


@dataclass
class KeyframeRecord:
    """A sample (2 Hz keyframe): its LiDAR sweep, the non-key sweeps after it (until the next keyframe),
    its boxes (global frame) and cameras (empty when the dataroot has none)."""

    token: str
    timestamp: int
    lidar: SweepRecord
    sweeps_after: list[SweepRecord]
    boxes: list[BoxRecord]
    cameras: list[CameraRecord] = field(default_factory=list)

    @property
    def ego2global(self) -> np.ndarray:
        return self.lidar.ego2global


@dataclass
class SceneRecord:
    """A scene: name, split and its keyframes in time order."""

    name: str
    token: str
    split: str
    keyframes: list[KeyframeRecord]

    def all_sweeps(self) -> list[tuple[int, SweepRecord]]:
        """Every sweep in time order as (keyframe index it follows, sweep)."""
        return [(k, s) for k, kf in enumerate(self.keyframes) for s in [kf.lidar, *kf.sweeps_after]]


def load_nuscenes(dataroot: str | os.PathLike, version: str, verbose: bool = False):
    """The devkit ``NuScenes`` object, with a clear error when the tables are missing."""
    from nuscenes.nuscenes import NuScenes
    table_root = Path(dataroot) / version
    if not table_root.is_dir():
        raise FileNotFoundError(f"{table_root}: nuScenes tables not found (check --dataroot/--version)")
    needed = ["scene", "sample", "sample_data", "ego_pose", "calibrated_sensor", "sample_annotation",
              "instance", "category", "sensor", "log"]
    missing = [t for t in needed if not (table_root / f"{t}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{table_root}: missing nuScenes table(s) {[m + '.json' for m in missing]}")
    return NuScenes(version=version, dataroot=str(dataroot), verbose=verbose)


def scene_splits(dataroot: str | os.PathLike, version: str) -> dict[str, str]:
    """{scene_name: "train" | "val" | "test"} for the version (see the module docstring)."""
    if version in REAL_VERSIONS:
        from nuscenes.utils.splits import create_splits_scenes
        s = create_splits_scenes()
        names = {"v1.0-trainval": [("train", "train"), ("val", "val")],
                 "v1.0-mini": [("mini_train", "train"), ("mini_val", "val")],
                 "v1.0-test": [("test", "test")]}[version]
        return {scene: ours for theirs, ours in names for scene in s[theirs]}
    path = Path(dataroot) / version / "splits.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: splits file not found (non-official version {version!r} needs "
                                "<version>/splits.json with {{\"train\": [...], \"val\": [...]}})")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    return {scene: split for split, scenes in d.items() for scene in scenes}


class NuScenesSource:
    """Scene-level access to one nuScenes dataroot (real or synthetic) through the devkit."""

    def __init__(self, dataroot: str | os.PathLike, version: str, nusc=None):
        self.dataroot = Path(dataroot)
        self.version = version
        self.nusc = nusc if nusc is not None else load_nuscenes(dataroot, version)
        self.splits = scene_splits(dataroot, version)
        self.has_lidarseg = hasattr(self.nusc, "lidarseg")
        self._lidarseg_by_sd = ({r["sample_data_token"]: r["filename"] for r in self.nusc.lidarseg}
                                if self.has_lidarseg else {})

    def scene_names(self) -> list[str]:
        """All scene names, sorted (a deterministic order for sharding)."""
        return sorted(s["name"] for s in self.nusc.scene)

    def _sweep(self, sd: dict) -> SweepRecord:
        cs = self.nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        ep = self.nusc.get("ego_pose", sd["ego_pose_token"])
        seg = self._lidarseg_by_sd.get(sd["token"])
        return SweepRecord(sd["token"], int(sd["timestamp"]), self.dataroot / sd["filename"],
                           pose_matrix(cs["rotation"], cs["translation"]),
                           pose_matrix(ep["rotation"], ep["translation"]), bool(sd["is_key_frame"]),
                           self.dataroot / seg if seg else None)

    def _cameras(self, sample: dict) -> list[CameraRecord]:
        cams = []
        for channel, sd_token in sample["data"].items():
            if not channel.startswith("CAM"):
                continue
            sd = self.nusc.get("sample_data", sd_token)
            cs = self.nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            ep = self.nusc.get("ego_pose", sd["ego_pose_token"])
            if not cs.get("camera_intrinsic"):
                continue
            cams.append(CameraRecord(channel, pose_matrix(cs["rotation"], cs["translation"]),
                                     pose_matrix(ep["rotation"], ep["translation"]),
                                     np.asarray(cs["camera_intrinsic"], dtype=np.float64),
                                     int(sd.get("width") or 1600), int(sd.get("height") or 900)))
        return cams

    def boxes(self, sample_data_token: str) -> list[BoxRecord]:
        """Boxes at a sample_data's time, global frame; the devkit interpolates them for non-key sweeps."""
        out = []
        for b in self.nusc.get_boxes(sample_data_token):
            ann = self.nusc.get("sample_annotation", b.token)
            out.append(BoxRecord(ann["instance_token"], b.name, np.asarray(b.center, dtype=np.float64),
                                 np.asarray(b.wlh, dtype=np.float64), b.orientation.rotation_matrix,
                                 int(ann.get("num_lidar_pts", -1))))
        return out

    def scene(self, name: str) -> SceneRecord:
        """The scene's keyframes in time order, each with its LiDAR sweep, the sweeps up to the next
        keyframe (the ``next`` chain of sample_data) and its boxes."""
        recs = [s for s in self.nusc.scene if s["name"] == name]
        if not recs:
            raise KeyError(f"{self.dataroot / self.version}: scene {name!r} not found")
        sc = recs[0]
        keyframes, sample_token = [], sc["first_sample_token"]
        while sample_token:
            sample = self.nusc.get("sample", sample_token)
            if LIDAR not in sample["data"]:
                raise ValueError(f"{self.dataroot / self.version}: sample {sample_token} has no {LIDAR}")
            sd = self.nusc.get("sample_data", sample["data"][LIDAR])
            lidar = self._sweep(sd)
            after, nxt = [], sd["next"]
            while nxt:
                nsd = self.nusc.get("sample_data", nxt)
                if nsd["is_key_frame"]:
                    break
                after.append(self._sweep(nsd))
                nxt = nsd["next"]
            keyframes.append(KeyframeRecord(sample_token, int(sample["timestamp"]), lidar, after,
                                            self.boxes(sd["token"]), self._cameras(sample)))
            sample_token = sample["next"]
        return SceneRecord(name, sc["token"], self.splits.get(name, "unknown"), keyframes)
