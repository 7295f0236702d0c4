"""A small prepared dataset on disk (Occ3D layout + index.json) for stage tests: a flat road with a box
that moves one voxel per frame, so sequences are non-trivial yet predictable."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from occ_mfd.data.index import DatasetIndex, FrameEntry, SceneEntry, save_index
from occ_mfd.data.occ3d import OccFrame, labels_path, write_labels
from occ_mfd.grid import FREE_ID, GridSpec


def make_prepared(root: Path, grid: GridSpec, scenes=(("scene-a", "train"), ("scene-b", "val")),
                  frames: int = 11) -> Path:
    X, Y, Z = grid.shape
    entries = []
    for si, (name, split) in enumerate(scenes):
        fr = []
        for k in range(frames):
            sem = np.full((X, Y, Z), FREE_ID, np.uint8)
            sem[:, :, 0] = 11                                    # driveable surface
            x0 = (2 * k + 3 * si) % (X - 4)
            sem[x0:x0 + 3, Y // 2:Y // 2 + 2, 1:3] = 4           # a car moving along +x
            sem[:, -2:, 1:Z] = 15                                # a wall
            token = f"{name}-{k:03d}"
            write_labels(labels_path(root, name, token), OccFrame(sem, np.ones_like(sem), np.ones_like(sem)),
                         grid)
            pose = np.eye(4)
            pose[0, 3] = 2.0 * k
            fr.append(FrameEntry(token=token, timestamp=1_000_000 + 500_000 * k, ego2global=pose))
        entries.append(SceneEntry(name=name, split=split, frames=fr))
    save_index(root, DatasetIndex(grid=grid, scenes=entries, source={"kind": "test"}))
    return root
