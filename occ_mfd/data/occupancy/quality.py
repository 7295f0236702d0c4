"""Label quality of prepared occupancy against an exact truth (the synthetic world's ``--truth``).

On voxels our LiDAR observed (``mask_lidar`` = 1 in *our* labels): IoU of occupied-vs-free, per-class
IoU over the 17 semantic classes and their mean (classes absent from both sides are left out of the
mean), and **trail voxels**: our dynamic-class voxels (``DYNAMIC_CLASSES``) whose centre lies outside
every annotated box at that keyframe (boxes enlarged by half a voxel diagonal), as % of our dynamic voxels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from occ_mfd.data.index import load_index
from occ_mfd.data.occ3d import labels_path, read_labels
from occ_mfd.data.occupancy.points import points_in_box
from occ_mfd.grid import DYNAMIC_CLASSES, FREE_ID, NUM_CLASSES, OCC3D_CLASSES
from occ_mfd.scores import confusion_matrix, iou_from_confusion


@dataclass
class QualityReport:
    """iou: occupied-vs-free IoU; per_class: (17,) IoU (NaN where a class is in neither); miou: nanmean."""

    frames: int
    iou: float
    per_class: np.ndarray
    miou: float
    dynamic_voxels: int
    trail_voxels: int

    @property
    def trail_pct(self) -> float:
        return 100.0 * self.trail_voxels / max(1, self.dynamic_voxels)

    def summary(self) -> str:
        pc = ", ".join(f"{OCC3D_CLASSES[c]} {100 * v:.1f}" for c, v in enumerate(self.per_class) if np.isfinite(v))
        return (f"{self.frames} frames: IoU {100 * self.iou:.1f}, mIoU {100 * self.miou:.1f} "
                f"| trails {self.trail_voxels}/{self.dynamic_voxels} dynamic voxels ({self.trail_pct:.2f} %)\n"
                f"  per class: {pc}")


def trail_count(sem: np.ndarray, grid, boxes, ego2global: np.ndarray) -> tuple[int, int]:
    """(dynamic voxels, of which outside every box) for one frame; boxes are BoxRecords (global)."""
    dyn = np.isin(sem, DYNAMIC_CLASSES)
    idx = np.argwhere(dyn)
    if not len(idx):
        return 0, 0
    centres = grid.index_to_center(idx) @ ego2global[:3, :3].T + ego2global[:3, 3]
    inside = np.zeros(len(idx), bool)
    pad = grid.voxel_size * np.sqrt(3) / 2
    for b in boxes:
        m, _ = points_in_box(centres, b.box2global(), b.wlh, pad, pad)
        inside |= m
    return len(idx), int((~inside).sum())


def compare_to_truth(pred_root, truth_root, boxes_by_token=None, progress: bool = False) -> QualityReport:
    """Compare every frame of ``pred_root/index.json`` with ``truth_root/gts/...``.

    ``boxes_by_token``: {sample_token: [BoxRecord]} for the trail count (omit to skip it).
    """
    index = load_index(pred_root)
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    n = dyn = trail = 0
    for s in index.scenes:
        for f in s.frames:
            p = read_labels(labels_path(pred_root, s.name, f.token), index.grid)
            t = read_labels(labels_path(truth_root, s.name, f.token), index.grid)
            cm += confusion_matrix(p.semantics, t.semantics, NUM_CLASSES, mask=p.mask_lidar).numpy()
            if boxes_by_token is not None:
                d, tr = trail_count(p.semantics, index.grid, boxes_by_token.get(f.token, []), f.ego2global)
                dyn, trail = dyn + d, trail + tr
            n += 1
    iou, per, miou = iou_from_confusion(cm, FREE_ID)  # in %
    return QualityReport(n, iou / 100, per / 100, miou / 100, dyn, trail)
