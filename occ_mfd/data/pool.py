"""Load-time downsampling of Occ3D labels for small configs (e.g. 200×200×16 → 100×100×8 with factor 2).

Rule for semantics: a pooled voxel is free (17) only when all its f³ children are free; otherwise it
takes the most frequent *occupied* class among its children, ties broken towards the smallest id
(so the result is deterministic). Occupancy therefore never shrinks under pooling — thin structures
(poles, pedestrians) survive, which is what forecasting metrics need. Masks: observed if any child is.
"""
from __future__ import annotations

import numpy as np

from occ_mfd.grid import FREE_ID


def _blocks(a: np.ndarray, factor: int) -> np.ndarray:
    """(X, Y, Z) → (X/f, Y/f, Z/f, f³) children of each pooled voxel."""
    if a.ndim != 3:
        raise ValueError(f"pool: expected an (X, Y, Z) array, got shape {a.shape}")
    if any(n % factor for n in a.shape):
        raise ValueError(f"pool: shape {a.shape} is not divisible by factor {factor}")
    X, Y, Z = (n // factor for n in a.shape)
    b = a.reshape(X, factor, Y, factor, Z, factor).transpose(0, 2, 4, 1, 3, 5)
    return b.reshape(X, Y, Z, factor ** 3)


def pool_semantics(sem: np.ndarray, factor: int) -> np.ndarray:
    """(X, Y, Z) uint8 Occ3D ids → (X/f, Y/f, Z/f) uint8 (see the module docstring for the rule)."""
    if factor == 1:
        return np.asarray(sem, dtype=np.uint8)
    sem = np.asarray(sem)
    if sem.size and int(sem.max()) > FREE_ID:
        raise ValueError(f"pool_semantics: values must be Occ3D ids 0..{FREE_ID}, found {int(sem.max())}")
    b = _blocks(sem, factor)                        # (x, y, z, f³)
    out_shape = b.shape[:3]
    b = b.reshape(-1, b.shape[-1]).astype(np.int64)  # (N, f³)
    n = b.shape[0]
    # Per-voxel histogram over the 18 ids via one flat bincount (row * 18 + id).
    counts = np.bincount((np.arange(n)[:, None] * (FREE_ID + 1) + b).ravel(),
                         minlength=n * (FREE_ID + 1)).reshape(n, FREE_ID + 1)
    occ = counts[:, :FREE_ID]                        # (N, 17) occupied classes only
    best = occ.argmax(axis=1)                       # argmax returns the first max → smallest id on ties
    best[occ.sum(axis=1) == 0] = FREE_ID
    return best.astype(np.uint8).reshape(out_shape)


def pool_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """(X, Y, Z) 0/1 mask → (X/f, Y/f, Z/f) uint8: observed when any child is observed."""
    if factor == 1:
        return np.asarray(mask, dtype=np.uint8)
    return _blocks(np.asarray(mask), factor).any(axis=-1).astype(np.uint8)
