"""Semantic-occupancy forecasting metrics: dataset-level confusion matrices per future frame.

One (C, C) confusion matrix per horizon (rows = ground truth, columns = prediction) is accumulated over
the whole dataset with ``torch.bincount``; IoU and mIoU come from the summed counts through
:func:`occ_mfd.scores.iou_from_confusion` (its docstring states the definitions, incl. absent classes = NaN).

* Summaries, each labelled: ``*_mean_123`` = mean over the frames at 1 s, 2 s, 3 s (indices 1, 3, 5 at
  2 Hz; OccWorld/DOME), ``*_mean_all`` = mean over all future frames (OccFM). All values are in %.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from occ_mfd.grid import FREE_ID, KEYFRAME_DT_S, NUM_CLASSES, OCC3D_CLASSES
from occ_mfd.scores import iou_from_confusion, nanmean


@dataclass
class MetricResult:
    """Scores of one evaluated model, all in % (NaN where undefined).

    Attributes:
        horizons_s: (F,) seconds of each future frame (0.5 … 3.0).
        iou: (F,) occupied-vs-free IoU per future frame.
        miou: (F,) mean IoU over the semantic classes present (in GT or prediction) at that frame.
        per_class_iou: (F, free_id) IoU of each semantic class per frame; NaN = absent from both.
        confusion: (F, C, C) int64 counts, rows = ground truth, columns = prediction.
        iou_mean_123 / miou_mean_123: mean over the 1 s, 2 s, 3 s frames (OccWorld/DOME summary).
        iou_mean_all / miou_mean_all: mean over all future frames (OccFM summary).
        class_names: names of the semantic classes (length free_id).
    """

    horizons_s: np.ndarray
    iou: np.ndarray
    miou: np.ndarray
    per_class_iou: np.ndarray
    confusion: np.ndarray
    iou_mean_123: float
    miou_mean_123: float
    iou_mean_all: float
    miou_mean_all: float
    class_names: list[str] = field(default_factory=lambda: list(OCC3D_CLASSES[:FREE_ID]))

    def to_dict(self) -> dict:
        """JSON-ready dict in the ``tools/eval.py`` row shape (NaN → None; per-class IoU averaged over
        the frames where the class is defined)."""
        def num(v):
            v = float(v)
            return None if math.isnan(v) else v

        keys = [f"{h:.1f}" for h in self.horizons_s]
        with np.errstate(all="ignore"):
            pc = nanmean(self.per_class_iou, axis=0) if len(self.per_class_iou) else []
        return {
            "iou": {k: num(v) for k, v in zip(keys, self.iou)},
            "miou": {k: num(v) for k, v in zip(keys, self.miou)},
            "iou_mean_123": num(self.iou_mean_123), "miou_mean_123": num(self.miou_mean_123),
            "iou_mean_all": num(self.iou_mean_all), "miou_mean_all": num(self.miou_mean_all),
            "per_class_iou": {n: num(v) for n, v in zip(self.class_names, pc)},
            "per_class_iou_by_frame": {k: {n: num(v) for n, v in zip(self.class_names, row)}
                                       for k, row in zip(keys, self.per_class_iou)},
        }


class OccMetrics:
    """Accumulates per-horizon confusion matrices over a dataset.

    Args:
        num_classes: C, label ids 0..C-1 (Occ3D: 18 with free = 17).
        free_id: the free-space id (excluded from mIoU, the negative class of IoU).
        horizons: F, number of future frames per sample.
        frame_dt_s: seconds between future frames (0.5 at 2 Hz), for labels and the 1/2/3 s summary.

    Usage: ``update(pred, gt, mask)`` per batch, ``all_reduce()`` once under DDP, then ``compute()``.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, free_id: int = FREE_ID, horizons: int = 6,
                 frame_dt_s: float = KEYFRAME_DT_S):
        if free_id != num_classes - 1:
            # Semantic classes are 0..free_id-1 everywhere below (Occ3D: 0..16, free = 17).
            raise ValueError(f"OccMetrics: free_id must be the last id ({num_classes - 1}), got {free_id}")
        self.num_classes, self.free_id, self.horizons, self.frame_dt_s = num_classes, free_id, horizons, frame_dt_s
        self.confusion = torch.zeros(horizons, num_classes, num_classes, dtype=torch.int64)  # (F, C, C)

    def reset(self) -> None:
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add one batch.

        Args:
            pred, gt: (B, F, X, Y, Z) integer label tensors with values in 0..C-1.
            mask: optional (B, F, X, Y, Z) bool; only voxels where it is True are counted
                (e.g. Occ3D's ``mask_camera``).
        """
        if pred.shape != gt.shape or pred.dim() != 5:
            raise ValueError(f"OccMetrics.update: pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must "
                             "both be (B, F, X, Y, Z)")
        if pred.shape[1] != self.horizons:
            raise ValueError(f"OccMetrics.update: got {pred.shape[1]} future frames, expected {self.horizons}")
        if pred.is_floating_point() or gt.is_floating_point():
            raise ValueError("OccMetrics.update: pred and gt must be integer label tensors (take argmax first)")
        if mask is not None and mask.shape != gt.shape:
            raise ValueError(f"OccMetrics.update: mask {tuple(mask.shape)} must match gt {tuple(gt.shape)}")
        C, F = self.num_classes, self.horizons
        for name, t in (("pred", pred), ("gt", gt)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= C):
                raise ValueError(f"OccMetrics.update: {name} holds labels {int(t.min())}..{int(t.max())}, "
                                 f"expected 0..{C - 1}")
        frame = torch.arange(F, device=gt.device).view(1, F, 1, 1, 1)
        # One flat code per voxel: frame·C² + gt·C + pred, so one bincount fills all F matrices.
        code = frame * (C * C) + gt.long() * C + pred.long()                              # (B, F, X, Y, Z)
        code = code[mask.bool()] if mask is not None else code.reshape(-1)
        counts = torch.bincount(code, minlength=F * C * C).view(F, C, C)
        self.confusion = self.confusion.to(counts.device) + counts

    def all_reduce(self) -> None:
        """Sum the matrices over all processes when a ``torch.distributed`` group exists; else a no-op."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return
        t = self.confusion
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            t = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        self.confusion = t.to(self.confusion.device)

    def compute(self) -> MetricResult:
        conf = self.confusion.cpu().numpy()
        per = [iou_from_confusion(c, self.free_id) for c in conf]
        iou = np.array([p[0] for p in per], dtype=np.float64)
        per_class = np.stack([p[1] for p in per]) if per else np.zeros((0, self.free_id))
        miou = np.array([p[2] for p in per], dtype=np.float64)
        horizons_s = self.frame_dt_s * np.arange(1, self.horizons + 1)
        # Frames at 1 s, 2 s, 3 s (indices 1, 3, 5 at 0.5 s steps); only those that exist.
        idx = [i for i, h in enumerate(horizons_s) if any(math.isclose(h, s) for s in (1.0, 2.0, 3.0))]
        names = list(OCC3D_CLASSES[:self.free_id]) if self.num_classes == NUM_CLASSES \
            else [str(i) for i in range(self.free_id)]
        m123 = lambda a: float(nanmean(a[idx])) if idx and np.any(~np.isnan(a[idx])) else float("nan")
        mall = lambda a: float(nanmean(a)) if np.any(~np.isnan(a)) else float("nan")
        return MetricResult(horizons_s=horizons_s, iou=iou, miou=miou, per_class_iou=per_class,
                            confusion=conf, iou_mean_123=m123(iou), miou_mean_123=m123(miou),
                            iou_mean_all=mall(iou), miou_mean_all=mall(miou), class_names=names)
