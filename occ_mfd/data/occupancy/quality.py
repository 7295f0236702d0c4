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
from occ_mfd.grid import DYNAMIC_CLASSES, FREE_ID, NUM_CLASSES, NUM_SEMANTIC, OCC3D_CLASSES


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


def confusion(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(18, 18) counts [truth, pred] over voxels where ``mask`` is set."""
    m = mask.astype(bool)
    return np.bincount(truth[m].astype(np.int64) * NUM_CLASSES + pred[m], minlength=NUM_CLASSES ** 2
                       ).reshape(NUM_CLASSES, NUM_CLASSES)


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
            cm += confusion(p.semantics, t.semantics, p.mask_lidar)
            if boxes_by_token is not None:
                d, tr = trail_count(p.semantics, index.grid, boxes_by_token.get(f.token, []), f.ego2global)
                dyn, trail = dyn + d, trail + tr
            n += 1
    occ_t = np.ones(NUM_CLASSES, bool)
    occ_t[FREE_ID] = False
    tp_occ = cm[np.ix_(occ_t, occ_t)].sum()
    iou = tp_occ / max(1, cm[occ_t].sum() + cm[:, occ_t].sum() - tp_occ)
    tp = np.diag(cm)[:NUM_SEMANTIC].astype(np.float64)
    denom = (cm.sum(0) + cm.sum(1) - np.diag(cm))[:NUM_SEMANTIC].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(denom > 0, tp / denom, np.nan)
    return QualityReport(n, float(iou), per, float(np.nanmean(per)), dyn, trail)
