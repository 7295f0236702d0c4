"""Label quality of prepared occupancy against an exact truth (the synthetic world's ``--truth``).

On voxels our LiDAR observed (``mask_lidar`` = 1 in *our* labels): IoU of occupied-vs-free, per-class
IoU over the 17 semantic classes and their mean (classes absent from both sides are left out of the
mean), each class's scored truth voxels (a class with a handful of them swings the mean), and **trail voxels**: our dynamic-class voxels (``DYNAMIC_CLASSES``) whose centre lies outside
every annotated box at that keyframe (boxes enlarged by half a voxel diagonal), as % of our dynamic voxels.

**Ground thickness** (``ground_thickness``): of the columns holding a ground-class voxel (driveable surface,
other flat, sidewalk, terrain), the share whose ground voxels span at most 2 layers (top − bottom + 1 ≤ 2),
and the ground voxels per layer. A road is a surface: exact labels score ~100 %; accumulating a hilly scene
with 2-D poses smears it over several layers (see :mod:`.vertical`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from occ_mfd.data.index import load_index
from occ_mfd.data.convention import check_conventions, folder_convention
from occ_mfd.data.occ3d import labels_path, read_labels
from occ_mfd.data.occupancy.points import points_in_box
from occ_mfd.grid import DYNAMIC_CLASSES, FREE_ID, NUM_CLASSES, OCC3D_CLASSES

#: Ground classes of the Occ3D table (driveable_surface, other_flat, sidewalk, terrain).
GROUND_IDS = (11, 12, 13, 14)
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
    ground_columns: int = 0
    ground_thin: int = 0
    ground_layers: np.ndarray | None = None
    truth_ground_columns: int = 0
    truth_ground_thin: int = 0
    truth_voxels: np.ndarray | None = None  # (17,) scored voxels of each class in the truth

    @property
    def thin_pct(self) -> float:
        """% of our ground columns whose ground spans ≤ 2 layers."""
        return 100.0 * self.ground_thin / max(1, self.ground_columns)

    @property
    def truth_thin_pct(self) -> float:
        return 100.0 * self.truth_ground_thin / max(1, self.truth_ground_columns)

    @property
    def trail_pct(self) -> float:
        return 100.0 * self.trail_voxels / max(1, self.dynamic_voxels)

    def summary(self) -> str:
        n = self.truth_voxels
        pc = ", ".join(f"{OCC3D_CLASSES[c]} {100 * v:.1f}" + ("" if n is None else f" ({n[c]:,})")
                       for c, v in enumerate(self.per_class) if np.isfinite(v))
        return (f"{self.frames} frames: IoU {100 * self.iou:.1f}, mIoU {100 * self.miou:.1f} "
                f"| trails {self.trail_voxels}/{self.dynamic_voxels} dynamic voxels ({self.trail_pct:.2f} %)\n"
                f"  ground: {self.thin_pct:.1f} % of {self.ground_columns} ground columns span ≤ 2 layers "
                f"(truth {self.truth_thin_pct:.1f} %); ground voxels per z layer: "
                f"{[] if self.ground_layers is None else self.ground_layers.tolist()}\n"
                f"  per class (scored truth voxels): {pc}")


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


def ground_thickness(sem: np.ndarray, max_layers: int = 2) -> tuple[int, int, np.ndarray]:
    """(columns holding ground, of which the ground spans ≤ ``max_layers`` layers, (Z,) ground voxels per layer)."""
    g = np.isin(sem, GROUND_IDS)
    any_g = g.any(axis=2)
    z = np.arange(sem.shape[2])
    top = np.where(g, z, -1).max(axis=2)
    bottom = np.where(g, z, sem.shape[2]).min(axis=2)
    span = (top - bottom + 1)[any_g]
    return int(any_g.sum()), int((span <= max_layers).sum()), g.sum(axis=(0, 1))


def compare_to_truth(pred_root, truth_root, boxes_by_token=None, progress: bool = False,
                     allow_convention_mismatch: bool = False) -> QualityReport:
    """Compare every frame of ``pred_root/index.json`` with ``truth_root/gts/...``.

    ``boxes_by_token``: {sample_token: [BoxRecord]} for the trail count (omit to skip it). Raises ValueError
    when the two folders declare different vertical conventions (``occ_mfd.data.convention``) unless
    ``allow_convention_mismatch``.
    """
    index = load_index(pred_root)
    check_conventions(folder_convention(pred_root), folder_convention(truth_root), f"labels {pred_root}",
                      f"truth {truth_root}", allow=allow_convention_mismatch)
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    n = dyn = trail = 0
    gc = gt = tgc = tgt = 0
    layers = np.zeros(index.grid.shape[2], np.int64)
    for s in index.scenes:
        for f in s.frames:
            p = read_labels(labels_path(pred_root, s.name, f.token), index.grid)
            t = read_labels(labels_path(truth_root, s.name, f.token), index.grid)
            cm += confusion_matrix(p.semantics, t.semantics, NUM_CLASSES, mask=p.mask_lidar).numpy()
            c, thin, per = ground_thickness(p.semantics)
            gc, gt, layers = gc + c, gt + thin, layers + per
            c, thin, _ = ground_thickness(t.semantics)
            tgc, tgt = tgc + c, tgt + thin
            if boxes_by_token is not None:
                d, tr = trail_count(p.semantics, index.grid, boxes_by_token.get(f.token, []), f.ego2global)
                dyn, trail = dyn + d, trail + tr
            n += 1
    iou, per, miou = iou_from_confusion(cm, FREE_ID)  # in %
    return QualityReport(n, iou / 100, per / 100, miou / 100, dyn, trail, gc, gt, layers, tgc, tgt, cm.sum(1))
