"""IoU and mIoU of semantic occupancy from confusion matrices: the one implementation that evaluation
(``occ_mfd.eval.metrics``), label quality (``occ_mfd.data.occupancy.quality``) and the VAE's training logs use.

* **IoU**: of the "occupied" class of the binarised problem (label ≠ free vs free).
* **mIoU**: mean over the semantic classes (ids below ``free_id``) of ``TP_c / (TP_c + FP_c + FN_c)``.
* A class **absent from both prediction and ground truth** has 0/0 IoU: it is NaN and left out of the mean
  (OccWorld's code counts it as 1, which inflates mIoU on small or class-poor sets; we never do).
Scores are computed once from summed counts (the Occ3D / OccWorld / OccFM convention), never as a mean of
per-sample scores.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from occ_mfd.grid import FREE_ID, IGNORE, NUM_CLASSES


@torch.no_grad()
def confusion_matrix(pred, target, num_classes: int = NUM_CLASSES, mask=None,
                     ignore_index: int | None = IGNORE) -> torch.Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction.

    pred, target: integer labels of one shape (torch tensors or numpy arrays); mask: optional bool of that
    shape, only voxels where it is set count; voxels whose target is ``ignore_index`` never count.
    """
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    keep = torch.ones_like(target, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    if ignore_index is not None:
        keep = keep & (target != ignore_index)
    code = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(code, minlength=num_classes * num_classes).view(num_classes, num_classes)


def nanmean(a, axis=None):
    """``np.nanmean`` without the 'Mean of empty slice' warning: an all-NaN mean is NaN by design here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return np.nanmean(a, axis=axis)


def iou_from_confusion(conf, free_id: int = FREE_ID) -> tuple[float, np.ndarray, float]:
    """One (C, C) confusion matrix (rows GT, columns prediction) → (IoU %, per-class IoU % (free_id,), mIoU %).

    Undefined (0/0) values are NaN; mIoU is the NaN-ignoring mean of the per-class IoU.
    """
    conf = np.asarray(conf, dtype=np.float64)
    occ = [c for c in range(conf.shape[0]) if c != free_id]
    tp = conf[np.ix_(occ, occ)].sum()             # occupied predicted as occupied (any class)
    fp = conf[free_id, occ].sum()                 # free predicted occupied
    fn = conf[occ, free_id].sum()                 # occupied predicted free
    den = tp + fp + fn
    iou = 100.0 * tp / den if den > 0 else float("nan")
    diag = np.diag(conf)[:free_id]
    union = conf.sum(0)[:free_id] + conf.sum(1)[:free_id] - diag
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(union > 0, 100.0 * diag / np.maximum(union, 1), np.nan)
    return iou, per_class, float(nanmean(per_class)) if np.any(~np.isnan(per_class)) else float("nan")
