"""The fast label paths equal their reference definitions: ray traversal (crossings named one by one vs all
crossings sorted per ray), the bincount vote (vs the sort-based count), one ray per end voxel (vs np.unique rows)."""
import numpy as np
import pytest

from occ_mfd.data.occupancy import raycast
from occ_mfd.data.occupancy.generate import _one_ray_per_end_voxel
from occ_mfd.data.occupancy.points import majority_vote
from occ_mfd.grid import NUM_CLASSES, OCC3D_GRID, GridSpec

G = GridSpec((0, 0, 0), (8, 4, 4), 1.0)


def _reference_traverse(o, e, grid):
    """Every ray through the reference method (per ray: all crossings sorted, pieces named by their midpoints)."""
    shape = np.asarray(grid.shape)
    lo = np.asarray(grid.lo)
    u0 = (np.broadcast_to(o, e.shape) - lo) / grid.voxel_size
    c0, c1, keep, inside = raycast._clip_to_grid(u0, (e - lo) / grid.voxel_size, shape)
    c0, c1, inside = c0[keep], c1[keep], inside[keep]
    if not len(c0):
        return np.zeros(0, np.int64)
    n = np.abs(np.ceil(np.maximum(c0, c1)) - np.floor(np.minimum(c0, c1)) - 1).astype(np.int64)
    return np.unique(raycast._traverse_chunk(c0, c1, inside, n, shape))


def _rays(kind, rng, n=400):
    if kind == "random":
        return rng.uniform(-3, 11, (n, 3)), rng.uniform(-3, 11, (n, 3))
    if kind == "integer":             # ends and origins on voxel corners and faces
        return rng.integers(-2, 10, (n, 3)).astype(float), rng.integers(-2, 10, (n, 3)).astype(float)
    if kind == "quarter":
        return rng.integers(0, 16, (n, 3)) * 0.25, rng.integers(0, 16, (n, 3)) * 0.5
    if kind == "along-a-plane":
        o = rng.uniform(0, 4, (n, 3))
        o[:, 1] = 2.0
        e = rng.uniform(0, 8, (n, 3))
        e[:, 1] = 2.0
        return o, e
    o = rng.uniform(0, 4, (n, 3))        # nearly parallel to the y and z planes
    return o, o + np.array([5.0, 1e-7, 3e-4]) * rng.uniform(-1, 1, (n, 1))


@pytest.mark.parametrize("kind", ["random", "integer", "quarter", "along-a-plane", "near-parallel"])
def test_fast_traversal_equals_reference_ray_by_ray(kind):
    rng = np.random.default_rng(7)
    o, e = _rays(kind, rng)
    for i in range(len(e)):
        trav, hit = raycast.traverse(o[i], e[i:i + 1], G)
        assert np.array_equal(trav, _reference_traverse(o[i], e[i:i + 1], G)), (kind, o[i], e[i])


def test_fast_traversal_on_lidar_like_rays_uses_the_fast_path():
    """Full Occ3D grid, one origin, 20k returns: same voxels as the reference, and almost every ray takes the
    fast path (the reference is for corners and rays along planes)."""
    rng = np.random.default_rng(1)
    o = np.array([0.3, -0.2, 1.84])
    e = rng.normal(0, 20, (20000, 3))
    e[:, 2] = rng.uniform(-2, 5, len(e))
    trav, hit = raycast.traverse(o, e, OCC3D_GRID)
    assert np.array_equal(trav, _reference_traverse(o, e, OCC3D_GRID))
    idx = np.floor((e - np.asarray(OCC3D_GRID.lo)) / 0.4).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < OCC3D_GRID.shape), axis=1)
    assert np.array_equal(hit, np.unique(np.ravel_multi_index(idx[inside].T, OCC3D_GRID.shape)))
    shape = np.asarray(OCC3D_GRID.shape)
    u0 = (np.broadcast_to(o, e.shape) - np.asarray(OCC3D_GRID.lo)) / 0.4
    c0, c1, keep, ends_inside = raycast._clip_to_grid(u0, (e - np.asarray(OCC3D_GRID.lo)) / 0.4, shape)
    hard = raycast._mark_crossings(np.zeros(OCC3D_GRID.num_voxels, bool), c0[keep], c1[keep], ends_inside[keep], shape)
    assert hard.mean() < 0.01


def _reference_vote(points, labels, grid, weights):
    """The sort-based vote: unique (voxel, class) keys, counts, then per voxel count descending, class ascending."""
    idx, inside = grid.point_to_index(points)
    key = np.ravel_multi_index(idx[inside].T, grid.shape) * NUM_CLASSES + labels[inside].astype(np.int64)
    ukey, counts = np.unique(key, return_counts=True)
    if weights is not None:
        counts = np.bincount(np.searchsorted(ukey, key), weights=weights[inside])
    vox, cls = ukey // NUM_CLASSES, ukey % NUM_CLASSES
    order = np.lexsort((cls, -counts, vox))
    vox, cls = vox[order], cls[order]
    first = np.r_[True, vox[1:] != vox[:-1]]
    return vox[first], cls[first].astype(np.uint8)


@pytest.mark.parametrize("weighted", [False, True])
def test_vote_equals_sort_based_reference(weighted):
    rng = np.random.default_rng(3)
    pts = rng.uniform(-1, 9, (5000, 3))          # some outside the grid
    labels = rng.integers(0, NUM_CLASSES - 1, len(pts))
    w = rng.integers(1, 4, len(pts)).astype(np.float32) if weighted else None
    got = majority_vote(pts, labels, G, w)
    want = _reference_vote(pts, labels, G, w)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_vote_ties_go_to_the_lower_class_weights_count():
    pts = np.array([[0.5, 0.5, 0.5]] * 4 + [[1.5, 0.5, 0.5]] * 3)
    labels = np.array([9, 4, 9, 4, 2, 7, 7])
    vox, cls = majority_vote(pts, labels, G)
    assert vox.tolist() == [0, 16] and cls.tolist() == [4, 7]      # 2-2 tie → 4; 7 beats 2
    vox, cls = majority_vote(pts, labels, G, np.array([1, 1, 3, 1, 5, 2, 2], np.float32))
    assert cls.tolist() == [9, 2]                                   # 4 vs 2 → 9; 5 vs 4 → 2


def test_one_ray_per_end_voxel_keeps_the_same_first_returns():
    rng = np.random.default_rng(5)
    ends = np.round(rng.normal(0, 30, (20000, 3)), 1)
    q = np.floor((ends - np.asarray(OCC3D_GRID.lo)) / OCC3D_GRID.voxel_size).astype(np.int64)
    _, first = np.unique(q, axis=0, return_index=True)
    assert np.array_equal(_one_ray_per_end_voxel(ends, OCC3D_GRID), ends[np.sort(first)])
