"""Write the simulator's exact occupancy truth in the prepared-occupancy layout (docs/design.md, "Data layout").

    <truth_root>/gts/<scene_name>/<sample_token>/labels.npz   semantics, mask_lidar, mask_camera (X, Y, Z) uint8
    <truth_root>/index.json                                    grid, classes, free id, source, scenes → frames

Semantics follow :mod:`.truth`: a solid claims every voxel it shares volume with (touching does not count),
ground only in its surface layer. Masks are all ones: the truth is known everywhere. The labels are in each keyframe's *true* ego frame
(ground at z = 0 under the car, tilted with it on hills); ``ego2global`` in the index is the written 2-D
pose (as in the dataroot's ``ego_pose``), and on hills ``ego2global_true`` holds the true 3-D one. ``labels.npz`` is written with fixed zip timestamps
(``np.savez`` stamps the current time), so the same truth gives byte-identical files.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from occ_mfd.grid import FREE_ID, NUM_CLASSES, OCC3D_CLASSES, OCC3D_GRID, GridSpec
from occ_mfd.data.synthetic.nuscenes_writer import is_planar, planar_pose
from occ_mfd.data.synthetic.scene import SimScene


def save_npz_deterministic(path: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez_compressed`` but byte-identical for identical arrays (fixed zip entry dates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


class TruthWriter:
    """Collects each scene's truth volumes as the nuScenes writer streams scenes (``on_scene`` callback)."""

    def __init__(self, root: Path, *, version: str, dataroot: str, grid: GridSpec = OCC3D_GRID):
        self.root, self.grid = Path(root), grid
        self.source = {"kind": "synthetic-truth", "version": version, "dataroot": dataroot}
        self.scenes: list[dict] = []

    def __call__(self, scene: SimScene, sample_tokens: list[str]) -> None:
        keys = sorted(scene.keyframes, key=lambda s: s.timestamp)
        if scene.truth is None or len(scene.truth) != len(keys):
            got = None if scene.truth is None else len(scene.truth)
            raise ValueError(f"scene {scene.name}: truth asked for but it has {got} volumes for {len(keys)} keyframes")
        frames = []
        for tok, sw, sem in zip(sample_tokens, keys, scene.truth):
            sem = np.asarray(sem)
            if sem.shape != self.grid.shape or sem.dtype != np.uint8 or (sem.size and sem.max() >= NUM_CLASSES):
                raise ValueError(f"scene {scene.name} sample {tok}: truth must be {self.grid.shape} uint8 with "
                                 f"ids < {NUM_CLASSES}, got {sem.shape} {sem.dtype}")
            ones = np.ones(self.grid.shape, np.uint8)
            save_npz_deterministic(self.root / "gts" / scene.name / tok / "labels.npz",
                                   semantics=sem, mask_lidar=ones, mask_camera=ones)
            fr = {"token": tok, "timestamp": int(sw.timestamp),
                  "ego2global": np.asarray(planar_pose(sw.ego2global), dtype=np.float64).tolist()}
            if not is_planar(sw.ego2global):
                fr["ego2global_true"] = np.asarray(sw.ego2global, dtype=np.float64).tolist()
            frames.append(fr)
        entry = {"name": scene.name, "split": scene.split, "frames": frames}
        if scene.terrain is not None:
            entry["terrain"] = scene.terrain
        self.scenes.append(entry)

    def finish(self) -> None:
        index = {"grid": self.grid.to_dict(), "classes": list(OCC3D_CLASSES), "free_id": FREE_ID,
                 "z_convention": "lidar", "source": self.source, "scenes": self.scenes}
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "index.json").write_text(json.dumps(index, indent=1))
