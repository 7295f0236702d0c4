"""``index.json``: the grid, class table, source and per-scene ordered keyframes of a prepared dataset.

Layout (extra keys are allowed anywhere and kept in ``extra``)::

    {"grid": GridSpec.to_dict(), "classes": [...18 names...], "free_id": 17, "source": {...},
     "z_convention": "lidar" | "occ3d" (optional; see occ_mfd.data.convention),
     "scenes": [{"name": str, "split": str,
                 "frames": [{"token": str, "timestamp": int (µs), "ego2global": 4×4 list,
                             "lidar2ego": 4×4 list (optional)}, ...]}]}

Frames are in time order (strictly increasing timestamps). ``lidar2ego`` (the LIDAR_TOP calibration of the
keyframe's point cloud) is written by ``prepare`` and the Occ3D import; indexes written before it existed lack
it, and only what needs LiDAR-frame trajectories (the released OccFM's condition) asks for it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from occ_mfd.atomic import atomic_write
from occ_mfd.grid import FREE_ID, OCC3D_CLASSES, GridSpec

INDEX_FILENAME = "index.json"


@dataclass
class FrameEntry:
    """One keyframe: sample token, timestamp (µs) and ego2global (4, 4) float64 pose."""

    token: str
    timestamp: int
    ego2global: np.ndarray
    extra: dict = field(default_factory=dict)

    @property
    def lidar2ego(self) -> np.ndarray | None:
        """(4, 4) float64 LIDAR_TOP → ego calibration of this keyframe, or None when the index lacks it."""
        m = self.extra.get("lidar2ego")
        return None if m is None else np.asarray(m, dtype=np.float64)

    @property
    def has_labels(self) -> bool:
        """False when the index marks this keyframe ``"labels": false`` (e.g. a missing Occ3D file)."""
        return bool(self.extra.get("labels", True))

    def to_dict(self) -> dict:
        return {**self.extra, "token": self.token, "timestamp": int(self.timestamp),
                "ego2global": np.asarray(self.ego2global, dtype=np.float64).tolist()}


@dataclass
class SceneEntry:
    """One scene: name, split ("train"/"val"/"test"/...), frames in time order."""

    name: str
    split: str
    frames: list[FrameEntry]
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.extra, "name": self.name, "split": self.split,
                "frames": [f.to_dict() for f in self.frames]}


@dataclass
class DatasetIndex:
    """The whole ``index.json``; ``classes``/``free_id`` default to the Occ3D table."""

    grid: GridSpec
    scenes: list[SceneEntry]
    source: dict = field(default_factory=dict)
    classes: list[str] = field(default_factory=lambda: list(OCC3D_CLASSES))
    free_id: int = FREE_ID
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.extra, "grid": self.grid.to_dict(), "classes": list(self.classes),
                "free_id": int(self.free_id), "source": dict(self.source),
                "scenes": [s.to_dict() for s in self.scenes]}

    def scene(self, name: str) -> SceneEntry:
        for s in self.scenes:
            if s.name == name:
                return s
        raise KeyError(f"scene {name!r} not in index")

    def scenes_of_split(self, split: str | None) -> list[SceneEntry]:
        """Scenes whose split equals ``split`` (all scenes when ``split`` is None)."""
        return [s for s in self.scenes if split is None or s.split == split]

    @property
    def num_frames(self) -> int:
        return sum(len(s.frames) for s in self.scenes)

    @classmethod
    def from_dict(cls, d: dict, where: str = "index") -> "DatasetIndex":
        """Parse and validate; errors name ``where`` (the file)."""
        def need(obj, key, ctx):
            if not isinstance(obj, dict) or key not in obj:
                raise ValueError(f"{where}: {ctx} lacks required key {key!r}")
            return obj[key]

        try:
            grid = GridSpec.from_dict(need(d, "grid", "top level"))
        except (TypeError, KeyError) as e:
            raise ValueError(f"{where}: 'grid' does not parse: {e}") from e
        except ValueError as e:
            raise ValueError(f"{where}: 'grid' does not parse: {e}") from e
        classes = list(need(d, "classes", "top level"))
        if classes != list(OCC3D_CLASSES):
            raise ValueError(f"{where}: 'classes' {classes} differ from the Occ3D table {list(OCC3D_CLASSES)}")
        free_id = need(d, "free_id", "top level")
        if free_id != FREE_ID:
            raise ValueError(f"{where}: 'free_id' is {free_id}, expected {FREE_ID}")
        scenes, seen = [], set()
        for si, s in enumerate(need(d, "scenes", "top level")):
            ctx = f"scenes[{si}]"
            name = str(need(s, "name", ctx))
            if name in seen:
                raise ValueError(f"{where}: scene {name!r} appears twice")
            seen.add(name)
            frames, last_ts = [], None
            for fi, f in enumerate(need(s, "frames", f"scene {name!r}")):
                fctx = f"scene {name!r} frame {fi}"
                ts = int(need(f, "timestamp", fctx))
                if last_ts is not None and ts <= last_ts:
                    raise ValueError(f"{where}: {fctx}: timestamp {ts} is not after the previous {last_ts} "
                                     "(frames must be in time order)")
                last_ts = ts
                pose = np.asarray(need(f, "ego2global", fctx), dtype=np.float64)
                if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
                    raise ValueError(f"{where}: {fctx}: 'ego2global' must be a finite 4×4 matrix, "
                                     f"got shape {pose.shape}")
                if "lidar2ego" in f:
                    calib = np.asarray(f["lidar2ego"], dtype=np.float64)
                    if calib.shape != (4, 4) or not np.all(np.isfinite(calib)):
                        raise ValueError(f"{where}: {fctx}: 'lidar2ego' must be a finite 4×4 matrix, "
                                         f"got shape {calib.shape}")
                fextra = {k: v for k, v in f.items() if k not in ("token", "timestamp", "ego2global")}
                frames.append(FrameEntry(str(need(f, "token", fctx)), ts, pose, fextra))
            sextra = {k: v for k, v in s.items() if k not in ("name", "split", "frames")}
            scenes.append(SceneEntry(name, str(need(s, "split", ctx)), frames, sextra))
        extra = {k: v for k, v in d.items() if k not in ("grid", "classes", "free_id", "source", "scenes")}
        return cls(grid, scenes, dict(d.get("source", {})), classes, int(free_id), extra)


def index_path(root: str | os.PathLike) -> Path:
    return Path(root) / INDEX_FILENAME


def load_index(root: str | os.PathLike) -> DatasetIndex:
    """Load ``root/index.json`` (or ``root`` itself when it is a file) and validate it."""
    p = Path(root)
    p = p if p.is_file() else index_path(p)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: index.json not found (run tools/prepare_data.py first)")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON (truncated?): {e}") from e
    return DatasetIndex.from_dict(d, where=str(p))


def save_index(root: str | os.PathLike, index: DatasetIndex, filename: str = INDEX_FILENAME) -> Path:
    """Write ``root/<filename>`` atomically (temp file in the same dir, then rename)."""
    root = Path(root)
    path = root / filename
    text = json.dumps(index.to_dict(), indent=1)
    return atomic_write(path, lambda f: f.write(text), binary=False)


def merge_indexes(indexes: list[DatasetIndex]) -> DatasetIndex:
    """Union of the scenes of several (shard) indexes, in first-seen order.

    Raises ValueError when grids differ, or when one scene name appears with different content
    (split, tokens, timestamps or poses); identical duplicates are kept once. ``source`` and extra
    top-level fields come from the first index.
    """
    if not indexes:
        raise ValueError("merge_indexes: nothing to merge")
    first = indexes[0]
    by_name: dict[str, SceneEntry] = {}
    for i, idx in enumerate(indexes):
        first.grid.check_same(idx.grid, f"merge_indexes: index #{i}")
        for s in idx.scenes:
            if s.name not in by_name:
                by_name[s.name] = s
                continue
            o = by_name[s.name]
            same = (o.split == s.split and len(o.frames) == len(s.frames) and all(
                a.token == b.token and a.timestamp == b.timestamp
                and np.allclose(a.ego2global, b.ego2global) for a, b in zip(o.frames, s.frames)))
            if not same:
                raise ValueError(f"merge_indexes: scene {s.name!r} differs between index #{i} and an "
                                 "earlier one (split, tokens, timestamps or poses)")
    return DatasetIndex(first.grid, list(by_name.values()), dict(first.source), list(first.classes),
                        first.free_id, dict(first.extra))
