"""Lovász-softmax loss (Berman, Rannen Triki & Blaschko, CVPR 2018, Alg. 1 & Eq. 12).

For each class c the per-voxel errors m_i = |[y_i = c] − p_i(c)| are sorted in decreasing order and
dotted with the gradient of the Jaccard loss Δ_J along that order; that is the Lovász extension of Δ_J
evaluated at m (a tight convex surrogate of 1 − IoU_c). The loss averages over classes present in the
ground truth (``classes="present"``) or all classes (``"all"``).
"""
from __future__ import annotations

import torch


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """(N,) 0/1 foreground sorted by decreasing error → Δ_J(S_i) − Δ_J(S_{i−1}) (Berman et al., Eq. 9)."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_softmax_flat(probs: torch.Tensor, labels: torch.Tensor, classes: str = "present") -> torch.Tensor:
    """probs (N, K) class probabilities, labels (N,) int → scalar loss (0 when N = 0)."""
    if probs.numel() == 0:
        return probs.sum() * 0.0
    losses = []
    for c in range(probs.shape[1]):
        fg = (labels == c).to(probs.dtype)
        if classes == "present" and fg.sum() == 0:
            continue
        errors = (fg - probs[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, lovasz_grad(fg[perm])))
    if not losses:
        return probs.sum() * 0.0
    return torch.stack(losses).mean()


def lovasz_softmax(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int | None = 255,
                   classes: str = "present") -> torch.Tensor:
    """logits (B, K, ...) and labels (B, ...) → scalar Lovász-softmax over all voxels of the batch."""
    K = logits.shape[1]
    probs = logits.softmax(dim=1).movedim(1, -1).reshape(-1, K)    # (N, K)
    labels = labels.reshape(-1)
    if ignore_index is not None:
        keep = labels != ignore_index
        probs, labels = probs[keep], labels[keep]
    return lovasz_softmax_flat(probs, labels, classes)
