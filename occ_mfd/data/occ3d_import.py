"""Index downloaded Occ3D-nuScenes labels, and verify a prepared output folder end to end.

Occ3D ships ``R/gts/<scene_name>/<sample_token>/labels.npz`` with no poses or order; those come from
nuScenes (the caller reads them with the devkit and passes ``frames_by_scene``).

Missing or invalid frames do not abort the import: they are reported and kept in the index with
``"labels": false`` so the scene's keyframe spacing stays intact (the sequence dataset skips windows
that touch such a frame). A scene with no valid label at all is left out of the index.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from occ_mfd.data.index import DatasetIndex, FrameEntry, SceneEntry, load_index
from occ_mfd.data.occ3d import labels_path, read_labels
from occ_mfd.grid import OCC3D_GRID, GridSpec

#: Frame field marking a keyframe without (valid) labels (see ``FrameEntry.has_labels``).
HAS_LABELS = "labels"


def _first(items: list, n: int = 5) -> str:
    more = f" … (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(str(x) for x in items[:n]) + more


@dataclass
class Occ3DImportReport:
    """Outcome of :func:`build_occ3d_index`.

    Attributes:
        num_frames: keyframes asked for (all scenes of ``frames_by_scene``); num_valid: of those, valid files.
        missing: (scene, token) pairs without a labels file.
        bad: (path, reason) pairs of files that exist but do not validate.
        dropped_scenes: scenes left out because none of their frames has valid labels.
        unknown_scenes: scene folders under ``R/gts`` that nuScenes did not list (ignored).
    """

    num_frames: int = 0
    num_valid: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    dropped_scenes: list[str] = field(default_factory=list)
    unknown_scenes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.bad)

    def summary(self) -> str:
        lines = [f"Occ3D import: {self.num_valid}/{self.num_frames} keyframes have valid labels"]
        if self.missing:
            lines.append(f"  missing: {len(self.missing)} frame(s), e.g. {_first(self.missing)}")
        if self.bad:
            lines.append(f"  invalid: {len(self.bad)} file(s), e.g. {_first([r for _, r in self.bad], 3)}")
        if self.dropped_scenes:
            lines.append(f"  scenes without any labels (left out): {len(self.dropped_scenes)}, "
                         f"e.g. {_first(self.dropped_scenes)}")
        if self.unknown_scenes:
            lines.append(f"  scene folders not in the nuScenes version (ignored): {len(self.unknown_scenes)}, "
                         f"e.g. {_first(self.unknown_scenes)}")
        return "\n".join(lines)


def build_occ3d_index(occ3d_root: str | os.PathLike,
                      frames_by_scene: Mapping[str, Sequence[tuple[str, int, np.ndarray]]],
                      splits: Mapping[str, str], source: dict | None = None,
                      grid: GridSpec = OCC3D_GRID, progress: bool = True,
                      ) -> tuple[DatasetIndex, Occ3DImportReport]:
    """Build the index for Occ3D labels under ``occ3d_root`` (every present file is read and validated).

    Args:
        occ3d_root: folder holding ``gts/``.
        frames_by_scene: {scene_name: [(sample_token, timestamp_us, ego2global (4, 4)[, lidar2ego (4, 4)]), ...]}
            in time order (lidar2ego, when given, is recorded in the index: LiDAR-frame trajectories need it).
        splits: {scene_name: split name}; every scene of ``frames_by_scene`` must have one.
        source: recorded as the index's ``source`` (``type: occ3d`` and the root are added).
        grid: the grid the files must match (Occ3D: 200×200×16).
    Returns:
        (index, report); the index lists scenes in the order of ``frames_by_scene``.
    """
    root = Path(occ3d_root)
    if not (root / "gts").is_dir():
        raise FileNotFoundError(f"{root / 'gts'}: Occ3D labels folder not found "
                                "(expected R/gts/<scene_name>/<sample_token>/labels.npz)")
    no_split = [s for s in frames_by_scene if s not in splits]
    if no_split:
        raise ValueError(f"build_occ3d_index: no split given for scene(s) {_first(no_split)}")
    report = Occ3DImportReport()
    report.unknown_scenes = sorted(p.name for p in (root / "gts").iterdir()
                                   if p.is_dir() and p.name not in frames_by_scene)
    total = sum(len(v) for v in frames_by_scene.values())
    bar = tqdm(total=total, desc="validate Occ3D labels", unit="frame", disable=not progress)
    scenes = []
    for name, frames in frames_by_scene.items():
        entries, n_valid = [], 0
        for token, ts, pose, *calib in frames:
            path = labels_path(root, name, token)
            extra = {"lidar2ego": np.asarray(calib[0], dtype=np.float64).tolist()} if calib else {}
            if not path.is_file():
                report.missing.append((name, token))
                extra[HAS_LABELS] = False
            else:
                try:
                    read_labels(path, grid)
                    n_valid += 1
                except ValueError as e:
                    report.bad.append((str(path), str(e)))
                    extra[HAS_LABELS] = False
            entries.append(FrameEntry(str(token), int(ts), np.asarray(pose, dtype=np.float64), extra))
            bar.update(1)
        report.num_frames += len(entries)
        report.num_valid += n_valid
        if n_valid == 0:
            report.dropped_scenes.append(name)
        else:
            scenes.append(SceneEntry(name, splits[name], entries))
    bar.close()
    src = {**(source or {}), "type": "occ3d", "occ3d_root": str(root.resolve())}
    # Occ3D's released labels draw the road at the grid floor and fill objects down to it (data/convention.py)
    return DatasetIndex(grid, scenes, src, extra={"z_convention": "occ3d"}), report


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_dataset`.

    Attributes:
        num_scenes, num_frames: as listed in the index; num_checked: files read and valid.
        declared_missing: frames the index itself marks ``"labels": false`` (not an error).
        missing: (scene, token) listed with labels but without a file.
        bad: (path, reason) files that do not validate.
        tmp_files: leftover temporary files (``*.tmp*``) under the root.
    """

    num_scenes: int = 0
    num_frames: int = 0
    num_checked: int = 0
    declared_missing: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    tmp_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.bad or self.tmp_files)

    def summary(self) -> str:
        lines = [f"verify: {'OK' if self.ok else 'FAILED'} — {self.num_scenes} scenes, {self.num_frames} "
                 f"keyframes, {self.num_checked} label files valid"
                 + (f", {self.declared_missing} marked without labels" if self.declared_missing else "")]
        if self.missing:
            lines.append(f"  missing files: {len(self.missing)}, e.g. {_first(self.missing)}")
        if self.bad:
            lines.append(f"  invalid files: {len(self.bad)}, e.g. {_first([r for _, r in self.bad], 3)}")
        if self.tmp_files:
            lines.append(f"  leftover temp files: {len(self.tmp_files)}, e.g. {_first(self.tmp_files)}")
        return "\n".join(lines)


def verify_dataset(root: str | os.PathLike, grid: GridSpec | None = None,
                   progress: bool = True) -> VerifyReport:
    """Check a prepared folder: index loads (and matches ``grid`` when given), every labelled frame's file
    exists and validates (keys, shape = index grid, uint8, ids 0..17, masks 0/1), no temp files remain.

    Index problems raise (nothing else can be checked); per-file problems are collected in the report.
    """
    root = Path(root)
    index = load_index(root)
    if grid is not None:
        grid.check_same(index.grid, str(root / "index.json"))
    rep = VerifyReport(num_scenes=len(index.scenes), num_frames=index.num_frames)
    bar = tqdm(total=index.num_frames, desc="verify", unit="frame", disable=not progress)
    for scene in index.scenes:
        for f in scene.frames:
            bar.update(1)
            if not f.has_labels:
                rep.declared_missing += 1
                continue
            path = labels_path(root, scene.name, f.token)
            if not path.is_file():
                rep.missing.append((scene.name, f.token))
                continue
            try:
                read_labels(path, index.grid)
                rep.num_checked += 1
            except ValueError as e:
                rep.bad.append((str(path), str(e)))
    bar.close()
    rep.tmp_files = sorted(str(p) for p in root.rglob("*.tmp*") if p.is_file())
    return rep
