"""Exact, vectorised voxel traversal of LiDAR rays (Amanatides & Woo 1987, done in bulk).

A segment from origin ``o`` to end point ``e`` crosses the voxel boundary planes of axis a at parameters
``s = (k - u0_a) / (u1_a - u0_a)`` for every integer ``k`` strictly between ``u0_a`` and ``u1_a`` (``u`` is
the position in voxel units). The segment's pieces, one per voxel, lie between consecutive crossings.

Fast path (:func:`_mark_crossings`): the voxel a piece lies in is the voxel *entered* at the crossing that
starts it — along the crossing's axis the plane's own index (``k`` going up, ``k - 1`` going down), along the
two other axes ``floor`` of the position at the crossing — plus the voxel of the first piece. So every crossing
names its voxel on its own: no per-ray sort of the crossings and no padding to the longest ray; the crossings
of all rays are one flat array per axis. This equals the sorted-pieces definition whenever no two crossings
(or a crossing and an end of the segment) nearly coincide. Rays where they do (a crossing within ``_TOL`` of
another axis' plane, or a piece near an end shorter than ``_TOL_T``: corners, rays along a plane) are few and
go to :func:`_traverse_chunk`, the reference method: sort all crossings, drop pieces shorter than ``_EPS``,
name each piece by its midpoint. Both paths return the same voxels on the same rays (tested).
"""
from __future__ import annotations

import numpy as np

from occ_mfd.grid import GridSpec

_EPS = 1e-9
#: Voxel units: a crossing this close to another axis' plane is a (near) corner → reference path. Far above
#: the reference's own resolution (_EPS × the longest clipped ray, ≈ 3e-7 on the Occ3D grid) and float error.
_TOL = 1e-5
#: Segment parameter: a first or last piece shorter than this → reference path (it drops pieces below _EPS).
_TOL_T = 1e-6


def _clip_to_grid(u0: np.ndarray, u1: np.ndarray, shape: np.ndarray):
    """Slab-clip segments (voxel units) to the box [0, shape]; returns clipped ends and a keep mask."""
    d = u1 - u0
    with np.errstate(divide="ignore", invalid="ignore"):
        ta = np.where(d != 0, (0.0 - u0) / d, -np.inf)
        tb = np.where(d != 0, (shape - u0) / d, np.inf)
    tmin = np.minimum(ta, tb)
    tmax = np.maximum(ta, tb)
    # Axes the ray is parallel to: inside the slab → no constraint, outside → reject.
    par = d == 0
    inside_par = (u0 >= 0) & (u0 < shape)
    tmin = np.where(par, -np.inf, tmin)
    tmax = np.where(par, np.where(inside_par, np.inf, -np.inf), tmax)
    t0 = np.maximum(tmin.max(axis=1), 0.0)
    t1 = np.minimum(tmax.min(axis=1), 1.0)
    keep = t1 > t0 + _EPS
    t1 = np.where(keep, t1, t0)  # rejected rays: finite, unused
    return u0 + t0[:, None] * d, u0 + t1[:, None] * d, keep, t1 >= 1.0


def _hit_ids(u1_all: np.ndarray, shape: np.ndarray) -> np.ndarray:
    hit_idx = np.floor(u1_all).astype(np.int64)
    hit_in = np.all((hit_idx >= 0) & (hit_idx < shape), axis=1)
    return np.ravel_multi_index(hit_idx[hit_in].T, tuple(shape))


def traverse(origins: np.ndarray, ends: np.ndarray, grid: GridSpec, chunk: int = 8192
             ) -> tuple[np.ndarray, np.ndarray]:
    """Voxels that segments pass through, and the voxels that hold their end points.

    Args:
        origins: (N, 3) or (3,) sensor origins, metric, in the grid's frame.
        ends: (N, 3) end points (the LiDAR returns).
        grid: the voxel grid.
    Returns:
        traversed: sorted unique flat voxel ids (C order over ``grid.shape``) crossed by a segment before
            it reaches its end voxel (the end voxel itself is excluded from that segment's list);
        hit: sorted unique flat ids of end voxels inside the grid.
    """
    trav = np.zeros(grid.num_voxels, bool)
    hit = np.zeros(grid.num_voxels, bool)
    traverse_into(trav, hit, origins, ends, grid, chunk)
    return np.flatnonzero(trav), np.flatnonzero(hit)


def traverse_into(trav: np.ndarray, hit: np.ndarray, origins: np.ndarray, ends: np.ndarray, grid: GridSpec,
                  chunk: int = 8192) -> None:
    """:func:`traverse`, marking ``trav`` and ``hit`` ((num_voxels,) bool) in place instead of returning ids:
    a bitmap is an O(n) union (``np.unique`` over millions of ids was most of the old cost)."""
    shape = np.asarray(grid.shape)
    ends = np.asarray(ends, dtype=np.float64)[:, :3]
    origins = np.broadcast_to(np.asarray(origins, dtype=np.float64)[..., :3], ends.shape)
    lo = np.asarray(grid.lo)
    u0_all = (origins - lo) / grid.voxel_size
    u1_all = (ends - lo) / grid.voxel_size
    hit[_hit_ids(u1_all, shape)] = True

    c0, c1, keep, ends_inside = _clip_to_grid(u0_all, u1_all, shape)
    c0, c1, ends_inside = c0[keep], c1[keep], ends_inside[keep]
    for s in range(0, len(c0), chunk):
        sl = slice(s, s + chunk)
        hard = _mark_crossings(trav, c0[sl], c1[sl], ends_inside[sl], shape)
        if hard.any():
            a, b, e = c0[sl][hard], c1[sl][hard], ends_inside[sl][hard]
            n_cross = np.abs(np.ceil(np.maximum(a, b)) - np.floor(np.minimum(a, b)) - 1).astype(np.int64)
            trav[_traverse_chunk(a, b, e, n_cross, shape)] = True


def _axis_crossings(u0a: np.ndarray, u1a: np.ndarray):
    """Flat list of one axis' plane crossings of every ray: (ray index, plane index k), in ray order and, per
    ray, in the order the ray meets them. The planes are the integers strictly between u0a and u1a."""
    lo = np.floor(np.minimum(u0a, u1a)) + 1            # the reference's first plane
    n = np.maximum(np.ceil(np.maximum(u0a, u1a)) - lo, 0).astype(np.int64)
    ray = np.repeat(np.arange(len(u0a)), n)
    start = np.cumsum(n) - n
    j = np.arange(len(ray)) - start[ray]
    up = u1a[ray] >= u0a[ray]
    k = np.where(up, lo[ray] + j, lo[ray] + (n[ray] - 1 - j))
    return ray, k, up


def _mark_crossings(trav, u0, u1, ends_inside, shape) -> np.ndarray:
    """Fast path: mark the voxel entered at every crossing (and each ray's first voxel) in ``trav``, except
    each ray's last piece when its end lies in the grid. Returns the (R,) mask of rays left to the reference
    path (nothing of theirs is marked here)."""
    R = len(u0)
    d = u1 - u0
    # Nearly parallel to an axis' planes yet crossing one: the reference's midpoints come within float error of
    # that plane, so leave such rays to it.
    hard = np.any((np.abs(d) < 1e-3) & (np.floor(u0) != np.floor(u1)), axis=1)
    t_first = np.ones(R)
    t_last = np.zeros(R)
    marks = []                                          # (ray, flat id, t) per axis
    strides = np.array([shape[1] * shape[2], shape[2], 1], np.int64)
    for a in range(3):
        ray, k, up = _axis_crossings(u0[:, a], u1[:, a])
        if not len(ray):
            continue
        t = (k - u0[:, a][ray]) / d[:, a][ray]           # the reference's crossing parameter, bit for bit
        flat = np.where(up, k, k - 1).astype(np.int64) * strides[a]
        for b in (x for x in range(3) if x != a):
            pos = u0[:, b][ray] + t * d[:, b][ray]
            cell = np.floor(pos)
            frac = pos - cell
            near = (frac < _TOL) | (frac > 1 - _TOL)     # near another axis' plane: a corner
            hard[ray[near]] = True
            # In range for every ray kept: 0 ≤ pos ≤ shape, and pos at 0 or shape is "near" (the ray is dropped).
            flat += cell.astype(np.int64) * strides[b]
        _reduce_min_max(t_first, t_last, ray, t)
        marks.append((ray, flat, t))
    hard |= (t_first < _TOL_T) | (t_last > 1 - _TOL_T)
    # The first piece: named by its midpoint, 0.5·(0 + first crossing), as the reference does (a ray without
    # crossings: [0, 1]); it starts on the grid's boundary for rays clipped from outside, so no 'entered' voxel.
    mid = 0.5 * t_first
    first = np.floor(u0 + mid[:, None] * d).astype(np.int64)
    first = np.clip(first, 0, shape - 1) @ strides
    has_cross = t_last > 0
    # The last piece holds the end point when it lies in the grid: that voxel is "hit", not traversed.
    drop_first = ~has_cross & ends_inside
    ok = ~hard & ~drop_first
    trav[first[ok]] = True
    for ray, flat, t in marks:
        ok = ~hard[ray] & ~(ends_inside[ray] & (t == t_last[ray]))
        trav[flat[ok]] = True
    return hard


def _reduce_min_max(t_first, t_last, ray, t) -> None:
    """Per ray, the smallest and largest crossing parameter (``ray`` is sorted: reduce over its runs)."""
    if not len(ray):
        return
    starts = np.flatnonzero(np.r_[True, ray[1:] != ray[:-1]])
    rows = ray[starts]
    t_first[rows] = np.minimum(t_first[rows], np.minimum.reduceat(t, starts))
    t_last[rows] = np.maximum(t_last[rows], np.maximum.reduceat(t, starts))


def _traverse_chunk(u0, u1, ends_inside, n_cross, shape) -> np.ndarray:
    """The reference method (see the module doc): flat ids of the pieces' voxels, per ray all crossings sorted."""
    d = u1 - u0
    ts = [np.zeros((len(u0), 1))]
    for a in range(3):
        k_max = int(n_cross[:, a].max()) if len(u0) else 0
        if k_max == 0:
            continue
        first = np.floor(np.minimum(u0[:, a], u1[:, a])) + 1  # first integer plane above the lower end
        ks = first[:, None] + np.arange(k_max)[None, :]        # (R, K)
        valid = ks < np.maximum(u0[:, a], u1[:, a])[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (ks - u0[:, a:a + 1]) / d[:, a:a + 1]
        ts.append(np.where(valid, t, np.inf))
    ts.append(np.ones((len(u0), 1)))
    t = np.sort(np.concatenate(ts, axis=1), axis=1)            # (R, 2 + ΣK)
    t_next = t[:, 1:]
    t_prev = t[:, :-1]
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(t_next) & (t_next - t_prev > _EPS)
    # The last piece holds the end point when it lies in the grid: that voxel is "hit", not traversed.
    last = np.isfinite(t_next) & ~np.isfinite(np.concatenate([t_next[:, 1:], np.full((len(t), 1), np.inf)], 1))
    ok &= ~(last & ends_inside[:, None])
    mid = 0.5 * (t_prev + np.where(np.isfinite(t_next), t_next, 0.0))
    r, c = np.nonzero(ok)
    p = u0[r] + mid[r, c, None] * d[r]
    idx = np.clip(np.floor(p).astype(np.int64), 0, shape - 1)
    return np.ravel_multi_index(idx.T, tuple(shape))
